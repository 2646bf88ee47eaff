# On a GPU machine, after `source benchmarks/device/env.sh`: builds FlashAttention-3 (the `hopper/` package,
# `flash_attn_3`) from the source carried in .whl/src, for Hopper, forward only, head dim 128, bf16 and FP8 (e4m3):
# the two kernels #26 compares with SageAttention at the Qwen and Wan shapes. No wheel on PyPI, and the card's
# machine fetches nothing. FLASH_ATTENTION_FORCE_BUILD: its setup would otherwise try to download a wheel first.
# Make the source archive here (1.2 MB: hopper/ and CUTLASS's headers at the commit its submodule pins):
#   fetch github:Dao-AILab/flash-attention and github:NVIDIA/cutlass, then
#   FA=<flash-attention's git directory> CU=<cutlass's git directory>; tmp=$(mktemp -d)
#   git --git-dir=$FA archive --prefix=flash-attention/ 0251105a hopper README.md LICENSE | tar -x -C $tmp
#   git --git-dir=$CU archive --prefix=flash-attention/csrc/cutlass/ 7127592069c2fe01b041e174ba4345ef9b279671 \
#     include LICENSE.txt | tar -x -C $tmp
#   tar -C $tmp -cf - flash-attention | xz -9 > .whl/src/flash-attention-0251105a-hopper.tar.xz
#   source benchmarks/device/fa3.sh      (log in .whl/fa3-build.log; FA3_JOBS sets the compiler's parallelism)
if ! ls .whl/extra/flash_attn_3-*.whl > /dev/null 2>&1; then
  started=$(date +%s)
  # Unpacked once per machine and built in place: a call whose limit cuts the build leaves ninja's objects, and the
  # next call on the same machine goes on from them.
  mkdir -p .whl/fa3-src .whl/extra &&
    { [ -f .whl/fa3-src/flash-attention/hopper/setup.py ] ||
      tar -C .whl/fa3-src -xJf .whl/src/flash-attention-*-hopper.tar.xz; } &&
    (cd .whl/fa3-src/flash-attention/hopper && FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS=${FA3_JOBS:-4} NVCC_THREADS=4 \
      FLASH_ATTENTION_DISABLE_BACKWARD=TRUE FLASH_ATTENTION_DISABLE_SPLIT=TRUE FLASH_ATTENTION_DISABLE_PAGEDKV=TRUE \
      FLASH_ATTENTION_DISABLE_APPENDKV=TRUE FLASH_ATTENTION_DISABLE_LOCAL=TRUE FLASH_ATTENTION_DISABLE_SOFTCAP=TRUE \
      FLASH_ATTENTION_DISABLE_PACKGQA=TRUE FLASH_ATTENTION_DISABLE_FP16=TRUE FLASH_ATTENTION_DISABLE_VARLEN=TRUE \
      FLASH_ATTENTION_DISABLE_CLUSTER=TRUE FLASH_ATTENTION_DISABLE_HDIM64=TRUE FLASH_ATTENTION_DISABLE_HDIM96=TRUE \
      FLASH_ATTENTION_DISABLE_HDIM192=TRUE FLASH_ATTENTION_DISABLE_HDIM256=TRUE FLASH_ATTENTION_DISABLE_SM80=TRUE \
      FLASH_ATTENTION_DISABLE_HDIMDIFF64=TRUE FLASH_ATTENTION_DISABLE_HDIMDIFF192=TRUE \
      python3 -m pip wheel -q --no-build-isolation --no-deps -w "$OLDPWD/.whl/extra" .) > .whl/fa3-build.log 2>&1
  echo "flash_attn_3 built in $(( $(date +%s) - started )) s: $(ls .whl/extra/ 2>/dev/null | grep flash)"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target .whl/site --upgrade .whl/extra/flash_attn_3-*.whl \
  2>&1 | grep -v WARNING
python3 -c "import flash_attn_interface; print('flash_attn_3 installed')"
