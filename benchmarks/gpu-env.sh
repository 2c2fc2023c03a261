# Source this on the GPU machine (it lacks flax, optax, orbax, diffusers, came-pytorch): installs the wheels
# carried in .whl/ (fetched here by ../shared/tools/gpu-wheels.sh) into a temporary folder and exposes the
# project's packages under their import names without a pip install of the project.
S=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$S" .whl/*.whl
ln -s "$PWD/conversion" "$S/sana_conversion"
ln -s "$PWD/kernels" "$S/sana_kernels"
export PYTHONPATH="$S:$PWD"
