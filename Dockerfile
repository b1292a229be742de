# One image for the three services, the migration tool and usage-rebuild
# (ops run it with `docker compose run --rm processors usage-rebuild ...`); docker-compose.yml
# picks the binary per service with `command:`.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends pkg-config zlib1g-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
    && mkdir /out \
    && cp target/release/usage-ingest target/release/usage-processors \
          target/release/usage-query target/release/usage-migrate \
          target/release/usage-rebuild /out/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl zlib1g && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 metering
COPY --from=build /out/ /usr/local/bin/
USER metering
ENV USAGE_LOG_FORMAT=json
