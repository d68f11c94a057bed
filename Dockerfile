# syntax=docker/dockerfile:1
# Images of gitproxy's two programs, built the same way as the tests' release
# build. protoc comes from the protoc-bin-vendored crate: no apt step.
#
#   docker build --target agent  -t gitproxy-agent:0.1.0 .
#   docker build --target broker -t gitproxy-broker:0.1.0 .
#
# Both images are distroless (glibc + CA certificates, no shell) and run as
# the non-root user 65532, matching the Helm charts' securityContext.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins -p gitproxy-broker -p gitproxy-agent \
 && mkdir -p /out \
 && cp target/release/gitproxy-broker target/release/gitproxy-agent /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS agent
COPY --from=builder /out/gitproxy-agent /usr/local/bin/gitproxy-agent
USER 65532:65532
# The agent's health state lives under /tmp (an emptyDir in the chart).
ENTRYPOINT ["/usr/local/bin/gitproxy-agent"]
CMD ["run"]

FROM gcr.io/distroless/cc-debian12:nonroot AS broker
COPY --from=builder /out/gitproxy-broker /usr/local/bin/gitproxy-broker
USER 65532:65532
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/gitproxy-broker"]
CMD ["serve"]
