from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v13(conn: Connection, scheme: Scheme) -> None:
    if scheme not in (Scheme.POSTGRES, Scheme.COCKROACH):
        return
    # An item queued under its lane's lock (the one dmbridge_lease_lane takes), held until the
    # transaction commits: a lane's ids are then given in the order their transactions commit,
    # so no item becomes pending behind (or before) one already leased. Its statements see
    # what was committed before each started (a volatile SQL function), so "first in its
    # lane" counts every item committed while it waited for the lock.
    # ($1, $2, $3: the lane; $4: type; $5: idempotency key; $6: payload; $7: now; $8: lease
    # end, or NULL not to lease it; $9: the lease's token.) The item as stored, none if one
    # with this key was queued before.
    await conn.execute("""
        CREATE FUNCTION dmbridge_queue(TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, BIGINT, BIGINT, TEXT)
        RETURNS SETOF outbox LANGUAGE sql VOLATILE AS $body$
            SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(9) || $2 || chr(9) || $3,
                                                          0));
            INSERT INTO outbox (network, remote_id, user_id, type, idempotency_key, payload,
                                state, attempts, next_attempt_at, lease_until, lease_token,
                                created_at, queued_at)
            SELECT $1, $2, $3, $4, $5, $6, 'pending', CASE WHEN f.first THEN 1 ELSE 0 END, $7,
                   CASE WHEN f.first THEN $8 END, CASE WHEN f.first THEN $9 END, $7, $7
            FROM (SELECT $8 IS NOT NULL AND NOT EXISTS (SELECT 1 FROM outbox p
                    WHERE p.state='pending' AND p.network=$1 AND p.remote_id=$2
                      AND p.user_id=$3) AS first) AS f
            ON CONFLICT (idempotency_key) DO NOTHING
            RETURNING *;
        $body$
    """)


upgrade_table.register(upgrade_v13, index=12, description="Outbox items queued under their"
                       " lane's lock")
