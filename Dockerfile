# syntax=docker/dockerfile:1
# balanced: one binary for `controller`, `proxy`, `standalone`.
# Build: docker build -t balanced:dev .
# The toolchain is pinned to Cargo.toml's rust-version (and rust-toolchain.toml);
# dependencies come from Cargo.lock as committed (--locked).
# Without a registry, tests/image/build.sh makes stand-ins for both base images
# and passes them as --build-arg BUILDER_IMAGE=... --build-arg RUNTIME_IMAGE=...

ARG BUILDER_IMAGE=rust:1.95.0-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
# Dependencies first, in their own layer: a source change does not rebuild them.
# Every [[bench]] in Cargo.toml gets a stub, or cargo refuses the manifest.
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY .cargo ./.cargo
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && for b in $(grep -A1 '^\[\[bench\]\]' Cargo.toml | sed -n 's/^name = "\(.*\)"/\1/p'); do \
      echo 'fn main() {}' > "benches/$b.rs"; done \
 && cargo build --profile dist --locked \
 && rm -rf src benches
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs && cargo build --profile dist --locked --bin balanced

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="balanced" \
      org.opencontainers.image.description="Kubernetes operator and proxy: active health checks, least connections, retries" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/balanced-dev/balanced" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /src/target/dist/balanced /usr/local/bin/balanced
USER 65532:65532
EXPOSE 9901
ENTRYPOINT ["/usr/local/bin/balanced"]
CMD ["--help"]
