"""How the package is found: the Triton kernels (top-level kernels/, installed as dla_fused.kernels)
must import from a source checkout however it was put on the path."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_import_from_a_source_tree_without_the_install_mapping():
    pytest.importorskip("triton")
    # What `setup.py develop` or PYTHONPATH gives: the checkout first on sys.path and no finder
    # from an editable install that maps dla_fused.kernels to kernels/.
    code = (
        "import sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "import dla_fused, dla_fused.kernels.aggregation as agg, dla_fused.kernels.ida_up as ida\n"
        "from dla_fused import backend\n"
        "print(agg.__file__, ida.__file__, dla_fused.__file__, hasattr(backend._triton_primitives(), 'agg_conv'))\n"
    )
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    agg_file, ida_file, package_file, has_conv = out.stdout.split()
    assert agg_file == os.path.join(ROOT, "kernels", "aggregation.py")
    assert ida_file == os.path.join(ROOT, "kernels", "ida_up.py")
    assert package_file == os.path.join(ROOT, "dla_fused", "__init__.py")
    assert has_conv == "True"
