#!/usr/bin/env bash
# Builds the image from the Dockerfile as it is, with stand-ins for its two base
# images made from what this machine reaches (no container registry here):
#
#   builder  ($BUILDER, for rust:1.95.0-bookworm): a Debian bookworm root
#            (debootstrap) with gcc, CA certificates, python3 (the image test's
#            client runs in it), and this machine's Rust
#            1.95.0 toolchain copied in under /usr/local/{rustup,cargo}
#   runtime  ($RUNTIME, for gcr.io/distroless/cc-debian12:nonroot): glibc,
#            libgcc, CA certificates, /etc/passwd with nonroot (65532); no
#            shell, no package manager
#
# Both are cached in Docker (and the root in $CACHE) between runs on one
# machine; FRESH=1 makes them again. Then `docker build` with
# --build-arg BUILDER_IMAGE/RUNTIME_IMAGE, nothing else changed, and prints
# the image's size, raw and compressed.
#
#   tests/image/build.sh            -> image $IMAGE (default balanced:test)
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/balanced-image}
BUILDER=${BUILDER:-balanced-standin/rust:1.95.0-bookworm}
RUNTIME=${RUNTIME:-balanced-standin/distroless-cc:nonroot}
IMAGE=${IMAGE:-balanced:test}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TOOLCHAIN=1.95.0
ARCH=x86_64-unknown-linux-gnu

say() { printf '[image] %s\n' "$*" >&2; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

if [ -n "${FRESH:-}" ]; then
  docker rmi -f "$BUILDER" "$RUNTIME" >/dev/null 2>&1 || true
  rm -rf "$CACHE"
fi
mkdir -p "$CACHE"

# A Debian bookworm root both stand-ins are cut from.
debian_root() {
  if [ -f "$CACHE/root/.complete" ]; then return; fi
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  say "debootstrap bookworm into $CACHE/root"
  rm -rf "$CACHE/root"
  debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates,python3 \
    bookworm "$CACHE/root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  rm -rf "$CACHE/root/var/cache/apt/archives/"*.deb
  touch "$CACHE/root/.complete"
}

make_builder() {
  debian_root
  local src
  src=$(dirname "$(dirname "$(rustup which rustc --toolchain "$TOOLCHAIN")")")
  say "builder: $CACHE/root + the $TOOLCHAIN toolchain from $src"
  local stage="$CACHE/builder"
  rm -rf "$stage"
  cp -a "$CACHE/root" "$stage"
  rm -f "$stage/.complete"
  local home="$stage/usr/local/rustup/toolchains/$TOOLCHAIN-$ARCH"
  mkdir -p "$home" "$stage/usr/local/cargo/bin"
  # The toolchain as rustup lays it out, so rust-toolchain.toml resolves to it
  # offline; its docs are left behind.
  tar -C "$src" --exclude=./share/doc -cf - . | tar -C "$home" -xf -
  printf 'version = "12"\ndefault_toolchain = "%s-%s"\n' "$TOOLCHAIN" "$ARCH" >"$stage/usr/local/rustup/settings.toml"
  cp "$(command -v rustup)" "$stage/usr/local/cargo/bin/rustup"
  for proxy in cargo rustc rustdoc rustfmt cargo-fmt cargo-clippy clippy-driver; do
    ln -sf rustup "$stage/usr/local/cargo/bin/$proxy"
  done
  # Crates come from crates.io through whatever CA this machine trusts.
  cp /etc/ssl/certs/ca-certificates.crt "$stage/etc/ssl/certs/ca-certificates.crt"
  tar -C "$stage" --numeric-owner -cf - . | docker import \
    -c 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV RUSTUP_HOME=/usr/local/rustup' -c 'ENV CARGO_HOME=/usr/local/cargo' \
    - "$BUILDER" >/dev/null
  rm -rf "$stage"
}

make_runtime() {
  debian_root
  say "runtime: glibc, libgcc, CA certificates, nonroot 65532, from $CACHE/root"
  local stage="$CACHE/runtime" lib="$CACHE/root/usr/lib/x86_64-linux-gnu"
  rm -rf "$stage"
  mkdir -p "$stage/lib/x86_64-linux-gnu" "$stage/lib64" "$stage/etc/ssl/certs" "$stage/tmp" \
    "$stage/home/nonroot" "$stage/usr/share"
  for so in ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libgcc_s.so.1 libpthread.so.0 libdl.so.2 librt.so.1 \
    libresolv.so.2 libnss_dns.so.2 libnss_files.so.2; do
    [ -e "$lib/$so" ] && cp -L "$lib/$so" "$stage/lib/x86_64-linux-gnu/$so"
  done
  ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$stage/lib64/ld-linux-x86-64.so.2"
  cp -L "$CACHE/root/etc/ssl/certs/ca-certificates.crt" "$stage/etc/ssl/certs/"
  cat >"$stage/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$stage/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
  echo 'hosts: files dns' >"$stage/etc/nsswitch.conf"
  chmod 1777 "$stage/tmp"
  chown 65532:65532 "$stage/home/nonroot"
  tar -C "$stage" --numeric-owner -cf "$CACHE/runtime.tar" .
  docker import -c 'USER 65532:65532' -c 'WORKDIR /home/nonroot' "$CACHE/runtime.tar" "$RUNTIME" >/dev/null
  rm -rf "$stage" "$CACHE/runtime.tar"
}

if have "$BUILDER"; then say "builder stand-in cached: $BUILDER"; else make_builder; fi
if have "$RUNTIME"; then say "runtime stand-in cached: $RUNTIME"; else make_runtime; fi

say "docker build -t $IMAGE (base images: $BUILDER, $RUNTIME)"
start=$(date +%s)
docker build -q \
  --build-arg BUILDER_IMAGE="$BUILDER" \
  --build-arg RUNTIME_IMAGE="$RUNTIME" \
  -t "$IMAGE" . >/dev/null
say "built in $(($(date +%s) - start)) s"

raw=$(docker image inspect -f '{{.Size}}' "$IMAGE")
compressed=$(docker save "$IMAGE" | gzip -1 | wc -c)
awk -v i="$IMAGE" -v r="$raw" -v c="$compressed" \
  'BEGIN { printf "image %s: %.1f MiB, %.1f MiB compressed (docker save | gzip -1)\n", i, r / 1048576, c / 1048576 }'
