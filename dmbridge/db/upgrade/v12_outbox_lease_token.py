from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


async def upgrade_v12(conn: Connection, scheme: Scheme) -> None:
    # Who holds an item's delivery lease: a token new for every lease taken, so that a
    # deliverer changes only the rows whose lease it still holds (never a row leased since by
    # another worker, nor a new row that took a deleted row's id on SQLite).
    await conn.execute("ALTER TABLE outbox ADD COLUMN lease_token TEXT")
    if scheme not in (Scheme.POSTGRES, Scheme.COCKROACH):
        return
    # A lane's next items leased in one round trip, under the lane's lock: its statements run
    # one after the other, each seeing what was committed before it started (a volatile SQL
    # function), so the lease sees every lease another worker took under the lock.
    # ($1, $2, $3: the lane; $4: the last id delivered; $5: now; $6: until; $7: the token;
    # $8: how many at most.)
    await conn.execute("""
        CREATE FUNCTION dmbridge_lease_lane(TEXT, TEXT, TEXT, BIGINT, BIGINT, BIGINT, TEXT,
                                            INTEGER)
        RETURNS SETOF outbox LANGUAGE sql VOLATILE AS $body$
            SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(9) || $2 || chr(9) || $3,
                                                          0));
            UPDATE outbox SET lease_until=$6, lease_token=$7, attempts=attempts+1
            WHERE state = 'pending' AND next_attempt_at <= $5
              AND (lease_until IS NULL OR lease_until < $5)
              AND id IN (SELECT c.id FROM (SELECT id FROM outbox
                           WHERE state='pending' AND network=$1 AND remote_id=$2
                             AND user_id=$3 AND id > $4 ORDER BY id LIMIT $8) AS c
                         WHERE NOT EXISTS (SELECT 1 FROM outbox b WHERE b.state='pending'
                           AND b.network=$1 AND b.remote_id=$2 AND b.user_id=$3
                           AND b.id > $4 AND b.id <= c.id
                           AND (b.next_attempt_at > $5 OR b.lease_until >= $5)))
            RETURNING *;
        $body$
    """)


upgrade_table.register(upgrade_v12, index=11, description="Outbox lease holders")
