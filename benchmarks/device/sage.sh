# On a GPU machine, after `source benchmarks/device/env.sh`: builds SageAttention 2 (attention_backend: sage) from
# the pinned source carried in .whl/src (no wheel on PyPI, and the card's machine fetches nothing), for Hopper, into
# .whl/extra, and installs it beside the other packages. ~4.5 min on 16 cores; nothing to do once built (the wheel,
# ~23 MB, stays on a machine kept warm between calls; it is too large to carry beside .whl/core).
# Make the source archive here, from a clone of thu-ml/SageAttention at pyproject.toml's pinned commit:
#   git archive --prefix=sageattention/ d1a57a5 -- csrc sageattention setup.py pyproject.toml MANIFEST.in LICENSE README.md \
#     | xz -9 > .whl/src/sageattention-d1a57a5.tar.xz
#   source benchmarks/device/sage.sh      (log in .whl/sage-build.log)
if ! ls .whl/extra/sageattention-*.whl > /dev/null 2>&1; then
  started=$(date +%s)
  rm -rf .whl/sage-src && mkdir -p .whl/sage-src .whl/extra &&
    tar -C .whl/sage-src -xJf .whl/src/sageattention-*.tar.xz &&
    (cd .whl/sage-src/sageattention && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 EXT_PARALLEL=4 \
      python3 -m pip wheel -q --no-build-isolation --no-deps -w "$OLDPWD/.whl/extra" .) > .whl/sage-build.log 2>&1
  echo "sageattention built in $(( $(date +%s) - started )) s: $(ls .whl/extra/ 2>/dev/null)"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target .whl/site --upgrade .whl/extra/sageattention-*.whl \
  2>&1 | grep -v WARNING
python3 -c "import sageattention; print('sageattention', getattr(sageattention, '__version__', '?'), 'installed')"
