# On a GPU machine, from the repository root, with .whl/core and .whl/recast carried (benchmarks/device/carry.sh):
#   source benchmarks/device/env.sh
# Unpacks the packages and ffmpeg once per machine (into .whl/site and .whl/bin: ignored by git), installs recast's
# wheel each time, byte-compiles (so no start in a measured row compiles .py files), and says what it runs on.
site=$PWD/.whl/site
export PYTHONPATH=$site PYTHONUNBUFFERED=1 IMAGEIO_FFMPEG_EXE=$PWD/.whl/bin/ffmpeg
started=$(date +%s)
if [ ! -f "$site/.unpacked" ]; then
  mkdir -p "$site" .whl/bin
  tar -C "$site" -xJf .whl/core/site.tar.xz || return 1
  for wheel in .whl/extra/*.whl; do  # e.g. a SageAttention wheel built on the card in an earlier call
    [ -f "$wheel" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel"
  done
  touch "$site/.unpacked"
fi
# ffmpeg and PostgreSQL may stay behind on a kernel call (`next.sh kernels`), whose sources need the carry's room;
# a later call on the same machine that carries them unpacks them then.
if [ ! -x .whl/bin/ffmpeg ]; then
  if [ -f .whl/core/ffmpeg.xz ]; then
    mkdir -p .whl/bin && xz -dc .whl/core/ffmpeg.xz > .whl/bin/ffmpeg && chmod +x .whl/bin/ffmpeg || return 1
  else
    echo "no .whl/core/ffmpeg.xz carried: nothing here can write an mp4"
  fi
fi
# `RECAST_SERVE_DATABASE=postgres` runs the carried PostgreSQL; as root, as a `postgres` user.
if [ -f .whl/core/postgresql.tar.xz ] && [ ! -f .whl/pg/.unpacked ]; then
  mkdir -p .whl/pg && tar -C .whl/pg -xJf .whl/core/postgresql.tar.xz && touch .whl/pg/.unpacked
fi
if [ -f .whl/pg/.unpacked ]; then
  export RECAST_POSTGRES_BIN=$(ls -d "$PWD"/.whl/pg/usr/lib/postgresql/*/bin | tail -1)
  if [ "$(id -u)" = 0 ]; then
    id postgres > /dev/null 2>&1 || useradd --system postgres
    if ! runuser -u postgres -- test -x "$RECAST_POSTGRES_BIN/postgres"; then  # a folder above is closed to others
      pg=$(mktemp -d) && chmod 755 "$pg" && cp -a .whl/pg/usr "$pg/" &&
        export RECAST_POSTGRES_BIN=$(ls -d "$pg"/usr/lib/postgresql/*/bin | tail -1)
    fi
  fi
fi
rm -rf "$site"/recast "$site"/recast-*.dist-info
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" --upgrade .whl/recast/recast-*.whl \
  2>&1 | grep -v WARNING
python3 -m compileall -q -j 0 "$site" > /dev/null 2>&1
echo "env ready in $(( $(date +%s) - started )) s on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
python3 -c "import torch, diffusers, transformers, prefect; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'prefect', prefect.__version__)"
