# Sourced by tests/gpu/run.sh and benchmarks/gpu.sh (from the repository root): sets PY. With the project's
# venv (.venv) that is all; on a lent GPU machine, which has torch and triton but not our other
# dependencies and no network, PY is python3 with the wheels `make gpu-wheels` put in .whl/ (carried with
# the working tree) on PYTHONPATH, and the C++/CUDA extension is built in place against that torch.
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
    PRISM_SITE=/tmp/prism_site
    mkdir -p "$PRISM_SITE"
    if compgen -G ".whl/*.whl" >/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PRISM_SITE" .whl/*.whl
    fi
    # the top-level triton_kernels/ folder is installed as prism_triton_kernels (setup.py)
    ln -sfn "$PWD/triton_kernels" "$PRISM_SITE/prism_triton_kernels"
    export PYTHONPATH="$PRISM_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if ! $PY -c "import prism_mcore._C" 2>/dev/null; then
        $PY setup.py -q build_ext --inplace 2>&1 | tail -n 3
    fi
fi
