# The operator image, for machines with a container engine: `docker build -t promptflow-operator .`
# `make image` builds the same image without one (hack/image.sh): the release binary on a Debian 12
# base with glibc, libgcc, CA certificates and the nonroot user 65532, nothing else.
# The same image runs the operator and the activity-proxy sidecar (`promptflow-operator activity-proxy`).

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin promptflow-operator \
 && strip -o /promptflow-operator target/release/promptflow-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /promptflow-operator /usr/local/bin/promptflow-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/promptflow-operator"]
