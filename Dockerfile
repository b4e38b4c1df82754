# dmbridge: slim, non-root (uid 10001), state and config in the /data volume.
#   mkdir data && sudo chown -R 10001 data     # the volume must be writable by uid 10001
#   docker run --rm -v "$PWD/data:/data" IMAGE dmbridge generate -c /data/config.yaml \
#       -r /data/registration.yaml --homeserver http://synapse:8008 --domain example.org \
#       --address http://dmbridge:29340
#   docker run -v "$PWD/data:/data" -p 29340:29340 IMAGE
# The homeserver's container mounts data/registration.yaml (mode 0600): chown it to the uid the
# homeserver runs as (README.md, "Container").
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin dmbridge \
    && mkdir /data && chown dmbridge:dmbridge /data

WORKDIR /opt/dmbridge
# The exact versions of requirements.lock, checked against their hashes; then dmbridge itself.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY dmbridge ./dmbridge
RUN pip install --no-cache-dir --no-deps . && rm -rf /opt/dmbridge

USER dmbridge
WORKDIR /data
VOLUME /data
EXPOSE 29340
# Listen on every interface inside the container; the config file may still say 127.0.0.1.
ENV DMBRIDGE_APPSERVICE__HOSTNAME=0.0.0.0
# Healthy means ready (GET /_dmbridge/v1/health/ready answers 200); the port is
# appservice.port, 29340 unless DMBRIDGE_APPSERVICE__PORT says otherwise.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/_dmbridge/v1/health/ready' % os.environ.get('DMBRIDGE_APPSERVICE__PORT', '29340'), timeout=5)"]
CMD ["dmbridge", "run", "-c", "/data/config.yaml"]
