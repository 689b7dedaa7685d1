# microseg agent image. Build: docker build -t microseg .
# Stage 1 builds the eBPF programs (nightly, rust-src, bpf-linker 0.10.0), the
# `microseg` binary and the `microseg-cni` plugin; stage 2 is a slim runtime with
# iproute2 for diagnostics.
FROM rust:1.95-bookworm AS build
RUN rustup toolchain install nightly --component rust-src \
 && cargo +nightly install bpf-linker --version 0.10.0 --locked
WORKDIR /src
COPY . .
RUN cargo build --release --locked --package microseg-agent --bin microseg
# The CNI plugin runs on the host (the runtime executes it from /opt/cni/bin), not in
# this image: linked statically, it runs whatever C library the node has.
RUN target="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --package microseg-cni --target "$target" \
 && cp "target/$target/release/microseg-cni" /src/microseg-cni

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/microseg /usr/local/bin/microseg
COPY --from=build /src/microseg-cni /usr/local/bin/microseg-cni
ENTRYPOINT ["/usr/local/bin/microseg"]
CMD ["agent", "--config", "/etc/microseg/agent.yaml"]
