#!/usr/bin/env bash
# Build, here, what a GPU machine needs to run recast's benchmarks (nothing can be fetched there), into .whl/
# (ignored by git; name it in the device call's carry):
#   .whl/core/site.tar.xz   the packages of benchmarks/device/requirements.txt for CPython 3.12 x86-64 (~25 MB)
#   .whl/core/ffmpeg.xz     a static ffmpeg with x264 (imageio-ffmpeg 0.4.9's 4.2.2 build; ~19 MB): the newer
#                           wheel's binary is too large to carry beside the packages (64 MiB a call)
#   .whl/core/postgresql.tar.xz   this machine's Debian PostgreSQL (apt-get install postgresql), relocatable: the
#                           server programs, the modules Prefect's database loads (pg_trgm among them), its share
#                           folder and the shared libraries beyond glibc they need, in libs/ beside bin/ (~20 MB)
#   .whl/recast/*.whl       recast itself, from this working tree (run again after every change)
# On the machine, from the repository root: `source benchmarks/device/env.sh`.
#   benchmarks/device/carry.sh            everything (a few minutes: xz at level 9)
#   benchmarks/device/carry.sh recast     only recast's wheel
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux2010_x86_64)
rm -rf .whl/recast && "$python" -m pip wheel -q --no-deps --no-build-isolation -w .whl/recast . && ls .whl/recast
[ "${1:-all}" = recast ] && exit 0
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p .whl/core
pip_for_312=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")
"$python" -m pip download -q "${pip_for_312[@]}" -d "$work/wheels" -r benchmarks/device/requirements.txt
# imageio-ffmpeg: 0.8.1's package (recast's pin) without its binary, and 0.4.9's smaller binary beside it.
"$python" -m pip download -q "${pip_for_312[@]}" -d "$work/ff81" imageio-ffmpeg==0.8.1
"$python" -m pip download -q "${pip_for_312[@]}" -d "$work/ff49" imageio-ffmpeg==0.4.9
"$python" -m pip install -q "${pip_for_312[@]}" --no-compile --no-index --find-links "$work/wheels" \
  --find-links "$work/ff81" --target "$work/site" -r benchmarks/device/requirements.txt imageio-ffmpeg==0.8.1
rm -f "$work"/site/imageio_ffmpeg/binaries/ffmpeg-*
rm -rf "$work"/site/prefect/server/ui-v2  # Prefect's second UI, off unless enabled (11 MB): room for PostgreSQL
tar -C "$work/site" -cf - . | xz -9 -T0 > .whl/core/site.tar.xz
(cd "$work/ff49" && unzip -q -o imageio_ffmpeg-0.4.9-*.whl 'imageio_ffmpeg/binaries/ffmpeg-*')
xz -9 -T0 -c "$work"/ff49/imageio_ffmpeg/binaries/ffmpeg-* > .whl/core/ffmpeg.xz
# PostgreSQL: for the stream on `RECAST_SERVE_DATABASE=postgres` (the cards have none; env.sh points at it).
pg=$(ls -d /usr/lib/postgresql/*/ | sort -V | tail -1); pg=${pg%/}; version=${pg##*/}
if [ -x "$pg/bin/initdb" ]; then
  dest=$work/pg$pg; mkdir -p "$dest/bin" "$dest/lib" "$dest/libs" "$work/pg/usr/share/postgresql"
  cp -a "$pg"/bin/{postgres,initdb,pg_ctl,createdb} "$dest/bin/"
  cp -a "$pg"/lib/{plpgsql,dict_snowball,pg_trgm,libpqwalreceiver,pgoutput}.so "$pg"/lib/*_and_*.so "$dest/lib/"
  cp -a "/usr/share/postgresql/$version" "$work/pg/usr/share/postgresql/"
  for f in "$dest"/bin/* "$dest"/lib/*.so; do ldd "$f" | awk '/=>/ {print $3}'; done | sort -u |
    grep -v -E '/(libc|libm|libpthread|libdl|librt|libresolv|ld-linux[^/]*)\.so' | xargs -I{} cp -L {} "$dest/libs/"
  tar -C "$work/pg" -cf - . | xz -9 -T0 > .whl/core/postgresql.tar.xz
else
  echo "no PostgreSQL here (apt-get install postgresql): the card's stream runs on SQLite only" >&2
fi
du -sh .whl/core/* .whl/recast/*
