# stor in a container: mount the storage disks and a config, point CONFIG_FILE at it.
#   docker build -t stor .
#   chown -R 8321:8321 /mnt/data*          # the disks belong to the container's user
#   docker run -p 8321:8321 -v /mnt:/mnt -v $PWD/stor.json:/etc/stor.json:ro stor
FROM python:3.11-slim-bookworm

# A fixed UID/GID, so operators can chown the storage disks to it before the first run.
ARG STOR_UID=8321
RUN groupadd --system --gid ${STOR_UID} stor \
 && useradd --system --uid ${STOR_UID} --gid ${STOR_UID} --no-create-home --shell /usr/sbin/nologin stor

WORKDIR /app
# Dependencies first, in a layer of their own: a change to the source does not reinstall them.
COPY pyproject.toml README.md LICENSE ./
RUN mkdir stor && echo '__version__ = "0.0.0"' > stor/__init__.py \
 && pip install --no-cache-dir . && pip uninstall --yes stor && rm -rf stor
COPY stor ./stor
RUN pip install --no-cache-dir --no-deps .

ENV CONFIG_FILE=/etc/stor.json
EXPOSE 8321
USER stor
# Liveness only: /healthz touches no disk (a load balancer probes /readyz, see docs/deployment.md).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8321/healthz', timeout=2).status != 200)"
CMD ["stor", "serve", "--host", "0.0.0.0", "--port", "8321"]
