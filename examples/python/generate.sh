#!/usr/bin/env bash
# Generates the Python message classes (*_pb2.py) and gRPC stubs
# (*_pb2_grpc.py) of the public API (proto/rexmesh/v1/controller.proto and
# the files it imports) into OUT_DIR (default: ./gen next to
# this script). Nothing generated is committed: run this before the client.
#
# Tools, all from Debian (bookworm):
#   protoc                 protobuf-compiler 3.21  (proto3 `optional` needs protoc >= 3.15)
#   grpc_python_plugin     protobuf-compiler-grpc  (same gRPC release as python3-grpcio)
#   google/protobuf/*.proto  libprotobuf-dev       (Duration, Timestamp)
# Debian's python3-grpc-tools is NOT used: it bundles protoc 3.5.1, which
# rejects the `optional` fields in our protos.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
proto_root="$here/../../proto"
out="${1:-$here/gen}"
wkt_include="${WKT_INCLUDE:-/usr/include}"
plugin="${GRPC_PYTHON_PLUGIN:-$(command -v grpc_python_plugin || true)}"

missing() {
  echo "generate.sh: $1 not found." >&2
  echo "  install: apt-get install -y protobuf-compiler protobuf-compiler-grpc libprotobuf-dev python3-grpcio" >&2
  exit 1
}
command -v protoc >/dev/null || missing "protoc"
[ -n "$plugin" ] || missing "grpc_python_plugin"
[ -f "$wkt_include/google/protobuf/duration.proto" ] || missing "$wkt_include/google/protobuf/duration.proto"

# controller.proto and every rexmesh file it imports, followed transitively, so
# that a new import (session.proto came in with `rexmesh shell`) needs no edit here.
protos=()
todo=("rexmesh/v1/controller.proto")
while [ ${#todo[@]} -gt 0 ]; do
  f="${todo[0]}"; todo=("${todo[@]:1}")
  case " ${protos[*]-} " in *" $proto_root/$f "*) continue ;; esac
  protos+=("$proto_root/$f")
  while read -r dep; do todo+=("$dep"); done < <(sed -n 's/^import "\(rexmesh\/[^"]*\)";.*/\1/p' "$proto_root/$f")
done

rm -rf "$out/rexmesh"
mkdir -p "$out"
# -I proto: files are named rexmesh/v1/*.proto, so the generated modules are
# the Python package rexmesh.v1 (imports like `from rexmesh.v1 import task_pb2`).
protoc \
  -I "$proto_root" -I "$wkt_include" \
  --python_out="$out" \
  --grpc_python_out="$out" --plugin=protoc-gen-grpc_python="$plugin" \
  "${protos[@]}"
echo "generated $(find "$out/rexmesh" -name '*.py' | wc -l) modules in $out"
