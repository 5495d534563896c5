#!/usr/bin/env bash
# Prepare FlashAttention-4's wheels here for the GPU machine (Python 3.12, CUDA 13, x86_64, no
# network there), split into two device calls that each stay under the 64 MiB a call carries.
#
#   bash bench/carry_fa4.sh            # downloads into .fa4/ (git-ignored), prints the two calls
#
# What it fetches (pip download, binary wheels for cp312 manylinux x86_64, no dependencies
# resolved by pip): flash-attn-4 and what it needs beyond the GPU machine's image (see
# /work/.library/device/KINDS.md's package list): nvidia-cutlass-dsl with its base, core and
# cu13 libraries (one 92 MB wheel), apache-tvm-ffi, torch-c-dlpack-ext, quack-kernels.
# nvidia-cutlass-dsl also names nvidia-cutlass-dsl-libs-cu12, which is left out: the DSL loads
# whichever CUDA flavour is installed, and the machine runs CUDA 13. Versions are pinned below
# (override with FA4_VERSION=... etc.). Every wheel's requirements are checked against what is
# fetched plus what the image has; a wheel pip cannot fetch, or a requirement nothing covers,
# stops the script with a message saying which.
#
# Files larger than a call can carry are cut with `split`; the pieces are packed into
# .fa4/call1 and .fa4/call2 (each with the SHA-256 sums), and the script prints the two
# device-tool calls: the first copies its pieces to /tmp/fa4 on the machine, the second, right
# after (the machine stays warm 30 s), copies the rest, joins and checks the wheels, installs
# them into /tmp/site and runs bench/gpu.py.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.fa4"
PYTHON="${PYTHON:-python3}"
FA4_VERSION="${FA4_VERSION:-4.0.0b36}"
CUTLASS_DSL_VERSION="${CUTLASS_DSL_VERSION:-4.8.1}"
TVM_FFI_VERSION="${TVM_FFI_VERSION:-0.1.15.post2}"
DLPACK_EXT_VERSION="${DLPACK_EXT_VERSION:-0.1.5}"
QUACK_VERSION="${QUACK_VERSION:-0.6.5}"
CALL_LIMIT_MIB="${CALL_LIMIT_MIB:-64}"
BUDGET_S="${BUDGET_S:-520}"

PACKAGES=(
  "flash-attn-4==$FA4_VERSION"
  "nvidia-cutlass-dsl==$CUTLASS_DSL_VERSION"
  "nvidia-cutlass-dsl-libs-base==$CUTLASS_DSL_VERSION"
  "nvidia-cutlass-dsl-libs-core==$CUTLASS_DSL_VERSION"
  "nvidia-cutlass-dsl-libs-cu13==$CUTLASS_DSL_VERSION"
  "apache-tvm-ffi==$TVM_FFI_VERSION"
  "torch-c-dlpack-ext==$DLPACK_EXT_VERSION"
  "quack-kernels==$QUACK_VERSION"
)
# On the GPU machine's image already (KINDS.md), or deliberately left out (the CUDA 12 flavour).
PRESENT="torch einops typing-extensions cuda-bindings protobuf numpy nvidia-cutlass-dsl-libs-cu12 backports-strenum"

cd "$ROOT"
rm -rf "$DEST"
mkdir -p "$DEST/wheels"
if ! git check-ignore -q .fa4/wheels; then
  echo "carry_fa4.sh: .fa4/ is not ignored by git, so every device call would send it; add '/.fa4/' to .gitignore" >&2
  exit 1
fi
for package in "${PACKAGES[@]}"; do
  echo "fetching $package"
  if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --abi cp312 --abi abi3 --abi none \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
      -d "$DEST/wheels" "$package" 2>"$DEST/pip.err"; then
    grep -v "is ignored: it is neither a file nor a directory" "$DEST/pip.err" >&2 || true
    echo "carry_fa4.sh: pip could not fetch $package for Python 3.12 / manylinux x86_64 (above); FA4 cannot be carried" >&2
    exit 1
  fi
done

"$PYTHON" - "$DEST" "$CALL_LIMIT_MIB" "$PRESENT" <<'EOF'
"""Check the wheels' requirements, cut what is too large, pack the pieces into two calls."""
import hashlib, os, re, subprocess, sys, zipfile
from pathlib import Path

dest, limit_mib, present = Path(sys.argv[1]), float(sys.argv[2]), set(sys.argv[3].split())
wheels = sorted((dest / "wheels").glob("*.whl"))

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

names = set()
requirements = {}
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    names.add(norm(re.search(r"^Name: (.+)$", text, re.M).group(1).strip()))
    requirements[wheel.name] = [line.split(":", 1)[1].strip() for line in text.splitlines()
                                if line.startswith("Requires-Dist:") and "extra ==" not in line]
missing = []
for wheel, needs in requirements.items():
    for need in needs:
        requirement, _, marker = need.partition(";")
        if "python_version" in marker and "<" in marker:
            continue  # backports for older Pythons than 3.12
        name = norm(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))
        if name not in names and name not in present:
            missing.append(f"{wheel} needs {need}")
if missing:
    sys.exit("carry_fa4.sh: requirements nothing fetched or present covers:\n  " + "\n  ".join(missing))

# The tree travels with every call: what git would send (tracked and untracked, not ignored files).
listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True)
tree = sum(os.path.getsize(p) for p in listed.stdout.decode().split("\0") if p and os.path.isfile(p))
margin = 2 * 2**20
cap = int(limit_mib * 2**20) - tree - margin - 64 * 1024  # the sums file and the install script
total = sum(w.stat().st_size for w in wheels)
calls = 2
if cap <= 0 or total > calls * cap:
    sys.exit(f"carry_fa4.sh: {total / 2**20:.1f} MiB of wheels do not fit two calls of {cap / 2**20:.1f} MiB "
             f"(64 MiB less the {tree / 2**20:.1f} MiB tree)")

# Pieces: each wheel whole if it fits half the room, else cut in equal parts under that.
half = min(cap, -(-total // calls))
pieces = []
for wheel in wheels:
    size = wheel.stat().st_size
    parts = -(-size // half)
    if parts == 1:
        pieces.append((wheel, size))
        continue
    chunk = -(-size // parts)
    subprocess.run(["split", "-b", str(chunk), "-d", "-a", "2", str(wheel), str(dest / (wheel.name + ".part"))],
                   check=True)
    pieces += [(p, p.stat().st_size) for p in sorted(dest.glob(wheel.name + ".part*"))]
bins = [[] for _ in range(calls)]
for piece, size in sorted(pieces, key=lambda p: -p[1]):  # first fit, largest first
    target = next((b for b in bins if sum(s for _, s in b) + size <= cap), None)
    if target is None:
        sys.exit(f"carry_fa4.sh: cannot pack {piece.name} into {calls} calls of {cap / 2**20:.1f} MiB")
    target.append((piece, size))
sums = "".join(f"{hashlib.sha256(w.read_bytes()).hexdigest()}  {w.name}\n" for w in wheels)
for index, contents in enumerate(bins, start=1):
    folder = dest / f"call{index}"
    folder.mkdir()
    for piece, _ in contents:
        os.link(piece, folder / piece.name)
    (folder / "SHA256SUMS").write_text(sums)
    print(f"call {index}: {sum(s for _, s in contents) / 2**20:.1f} MiB in {len(contents)} files "
          f"(+ {tree / 2**20:.1f} MiB tree): " + ", ".join(p.name for p, _ in contents))
EOF

cat > "$DEST/call2/install.sh" <<'EOF'
# Sourced on the GPU machine by the second call: join the pieces, check and install the wheels,
# and put them on PYTHONPATH only if FlashAttention-4 then imports (else bench/gpu.py runs without it).
fa4_install() {
  mkdir -p /tmp/fa4 && cp .fa4/call2/* /tmp/fa4/ || return 1
  ( cd /tmp/fa4 && shopt -s nullglob \
    && for first in *.part00; do cat "${first%.part00}".part* > "${first%.part00}" || exit 1; done \
    && sha256sum -c --quiet SHA256SUMS \
    && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
         $(sed 's/^[0-9a-f]*  //' SHA256SUMS) ) || return 1
  # --target runs no .pth file: nvidia_cutlass_dsl's puts its dsl_packages (the cutlass module) on the path.
  local path="/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
  PYTHONPATH="$path" python3 -c "import flash_attn.cute, cutlass" || return 1
  export PYTHONPATH="$path"
}
if fa4_install; then
  echo "FlashAttention-4 installed in /tmp/site"
else
  echo "FlashAttention-4 NOT installed: bench/gpu.py runs without it" >&2
fi
EOF

cat <<EOF

Two device-tool calls, back to back (the second within 30 s of the first, so the machine is still warm):

1. run(carry=[".fa4/call1"], timeout_s=120,
       command="mkdir -p /tmp/fa4 && cp .fa4/call1/* /tmp/fa4/ && ls -l /tmp/fa4")

2. run(carry=[".fa4/call2"], timeout_s=600,
       command=". .fa4/call2/install.sh; PYTHONUNBUFFERED=1 python3 bench/gpu.py --out \$OUT --budget-s $BUDGET_S")

If the second call lands on a fresh machine (no /tmp/fa4 from the first), the checksum fails, it
says "FlashAttention-4 NOT installed" and bench/gpu.py runs without it (the FA4 columns stay empty).
Without FA4 at all: run(timeout_s=600, command="PYTHONUNBUFFERED=1 python3 bench/gpu.py --out \$OUT").
EOF
