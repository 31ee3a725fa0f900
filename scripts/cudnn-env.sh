#!/usr/bin/env bash
# Prints an `export LD_LIBRARY_PATH=...` that adds the folder of the cuDNN 9 that PyTorch's wheels
# installed (nvidia/*/lib/libcudnn.so.9 under site-packages), for Atelier's run-time cuDNN
# convolutions on the GPU machine; prints nothing when there is none (Atelier then uses its own
# im2col convolutions). Use: eval "$(bash scripts/cudnn-env.sh)"
dirs=$(python3 - <<'PY' 2>/dev/null
import glob, site
found = set()
for root in site.getsitepackages() + [site.getusersitepackages()]:
    for path in glob.glob(root + "/nvidia/*/lib/libcudnn.so.9"):
        found.add(path.rsplit("/", 1)[0])
print(":".join(sorted(found)))
PY
)
[[ -n $dirs ]] && echo "export LD_LIBRARY_PATH=$dirs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exit 0
