# stor in a container: mount the storage disks and a config, point CONFIG_FILE at it.
#   docker build -t stor .
#   docker run -p 8321:8321 -v /mnt:/mnt -v $PWD/stor.json:/etc/stor.json stor
FROM python:3.11-slim-bookworm

WORKDIR /app
COPY pyproject.toml README.md ./
COPY stor ./stor
RUN pip install --no-cache-dir . && useradd --system --no-create-home stor

ENV CONFIG_FILE=/etc/stor.json
EXPOSE 8321
# Root only if the disks demand it: stor needs read and write access to every storage directory.
USER stor
CMD ["stor", "serve", "--host", "0.0.0.0", "--port", "8321"]
