"""``gcsam.plotting`` on synthetic landscapes (no model needed), the deprecated
``gcsam.landscape.plot_*`` aliases, and matplotlib staying out of the measuring modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest

import gcsam
from gcsam import landscape, plotting
from gcsam.landscape import Landscape

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SOURCE = Path(gcsam.__file__).parent / "analysis"


def bowl(curvature: float, grid: int = 5) -> Landscape:
    """A plane with loss ``0.1 + a^2 + curvature b^2`` and accuracy falling away from 0."""
    coords = np.linspace(-1.0, 1.0, grid)
    alphas, betas = np.meshgrid(coords, coords)  # [beta, alpha], the landscape convention
    loss = 0.1 + alphas**2 + curvature * betas**2
    return Landscape(
        "plane", [coords, coords.copy()], loss, np.exp(-loss), {}, 0.1, float(np.exp(-0.1))
    )


PLANES = {"adam": bowl(4.0), "sam": bowl(2.0), "gcsam": bowl(1.0)}
LINE = Landscape("line", [np.linspace(-1, 1, 5)], np.linspace(1, 2, 5), np.full(5, np.nan))
INTERPOLATION = Landscape(
    "interpolation",
    [np.linspace(-0.25, 1.25, 7)],
    np.array([0.6, 0.3, 0.5, 0.9, 0.5, 0.2, 0.4]),
    np.linspace(0.5, 0.9, 7),
    {},
    (0.3, 0.2),
    (0.8, 0.9),
)

# One figure per function, every option covered; the variants add rendering time only.
PLOTS: dict[str, Callable[[Path], Path]] = {
    "contour_log": lambda path: plotting.plot_contour(
        PLANES["sam"], path, log=True, vmax=5.0, levels=10
    ),
    "surface_log": lambda path: plotting.plot_surface(PLANES["gcsam"], path, log=True),
    "line": lambda path: plotting.plot_line({"line": LINE, "adam to sam": INTERPOLATION}, path),
    "comparison": lambda path: plotting.plot_comparison(PLANES, path, title="three runs"),
}
VARIANTS: dict[str, Callable[[Path], Path]] = {
    "contour": lambda path: plotting.plot_contour(PLANES["adam"], path, title="adam"),
    "surface": lambda path: plotting.plot_surface(PLANES["adam"], path, vmax=2.0),
    "line_log": lambda path: plotting.plot_line({"line": LINE}, path, log=True, accuracy=False),
    "comparison_log": lambda path: plotting.plot_comparison(PLANES, path, log=True, vmin=0.5),
    "comparison_3d": lambda path: plotting.plot_comparison(PLANES, path, kind="surface"),
}


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1024, path


@pytest.mark.parametrize("name", list(PLOTS))
def test_plot_writes_a_png(name: str, tmp_path: Path) -> None:
    path = tmp_path / "sub" / f"{name}.png"  # the folder is created
    assert PLOTS[name](path) == path
    assert_png(path)


@pytest.mark.slow  # about 1 s each, 5 s together on a busy 2-core machine
@pytest.mark.parametrize("name", list(VARIANTS))
def test_plot_variant_writes_a_png(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.png"
    assert VARIANTS[name](path) == path
    assert_png(path)


def test_colour_scale() -> None:
    """Shared range over all panels, log ranges from the positive values, a flat landscape
    still gets increasing levels, and ``extend`` names the clipped ends."""
    surfaces = [np.array([[0.5, 2.0]]), np.array([[-1.0, np.nan, 4.0]])]
    assert plotting._loss_range(surfaces, None, None, log=False) == (-1.0, 4.0)
    assert plotting._loss_range(surfaces, None, None, log=True) == (0.5, 4.0)
    assert plotting._loss_range(surfaces, 1.0, 3.0, log=False) == (1.0, 3.0)
    low, high = plotting._loss_range([np.ones((2, 2))], None, None, log=False)
    assert high > low == 1.0
    np.testing.assert_allclose(plotting._levels(1.0, 100.0, 3, log=True), [1.0, 10.0, 100.0])
    assert plotting._extend(surfaces, 1.0, 3.0) == "both"
    assert plotting._extend(surfaces, -1.0, 3.0) == "max"
    assert plotting._extend(surfaces, -1.0, 4.0) == "neither"
    with pytest.raises(ValueError, match="vmin must be > 0"):
        plotting._loss_range(surfaces, -1.0, None, log=True)
    with pytest.raises(ValueError, match="no finite loss values > 0"):
        plotting._loss_range([np.array([-1.0, np.nan])], None, None, log=True)


def test_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match="landscapes is empty"):
        plotting.plot_comparison({}, path)
    with pytest.raises(ValueError, match="landscapes is empty"):
        plotting.plot_line({}, path)
    with pytest.raises(ValueError, match="not a plane"):
        plotting.plot_contour(LINE, path)
    with pytest.raises(ValueError, match="not a plane"):
        plotting.plot_surface(INTERPOLATION, path)
    with pytest.raises(ValueError, match=r"landscapes\['b'\] is a line, not a plane"):
        plotting.plot_comparison({"a": PLANES["sam"], "b": LINE}, path)
    with pytest.raises(ValueError, match="is a plane"):
        plotting.plot_line({"plane": PLANES["sam"]}, path)
    with pytest.raises(ValueError, match="kind"):
        plotting.plot_comparison(PLANES, path, kind="heatmap")
    with pytest.raises(ValueError, match="levels"):
        plotting.plot_contour(PLANES["sam"], path, levels=1)
    assert not path.exists()


def test_landscape_plot_names_are_deprecated_aliases() -> None:
    for name in plotting.__all__:
        with pytest.warns(DeprecationWarning, match=f"gcsam.plotting.{name}"):
            assert getattr(landscape, name) is getattr(plotting, name)
    with pytest.raises(AttributeError, match="plot_heatmap"):
        landscape.plot_heatmap  # noqa: B018


def imported(nodes: Iterable[ast.AST]) -> set[str]:
    """The modules and names the import statements among ``nodes`` name (``.x`` relative)."""
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names.add(module)
            names.update(f"{module.rstrip('.')}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", ["landscape", "sharpness", "_measure", "_hessian"])
def test_measuring_modules_import_no_plots(module: str) -> None:
    """matplotlib is plotting's alone (landscape imports plotting inside its deprecated
    ``__getattr__`` only), and the library layer never reaches into the toolkit."""
    tree = ast.parse((SOURCE / f"{module}.py").read_text())
    anywhere = imported(ast.walk(tree))
    assert not [n for n in anywhere if n.split(".")[0] == "matplotlib"]
    assert not [n for n in anywhere if n.startswith(("gcsam.toolkit", ".toolkit"))]
    assert ".plotting" not in imported(tree.body)  # not at import time
    assert (".plotting" in anywhere) == (module == "landscape")


def test_deprecated_alias_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib the plot names fail on use, with matplotlib named."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    for name in ("gcsam.plotting", "gcsam.analysis.plotting"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delattr(gcsam.analysis, "plotting")
    monkeypatch.delattr(gcsam, "plotting", raising=False)
    with pytest.warns(DeprecationWarning), pytest.raises(ImportError, match="matplotlib"):
        landscape.plot_line  # noqa: B018


@pytest.mark.slow
def test_measuring_modules_need_no_matplotlib() -> None:
    """``gcsam.landscape`` and ``gcsam.sharpness`` import with matplotlib unavailable, load
    neither the toolkit nor the plots, and say what is missing on a deprecated plot name."""
    code = (
        "import sys, warnings\n"
        "sys.modules['matplotlib'] = None\n"  # makes `import matplotlib` fail
        "import gcsam.landscape, gcsam.sharpness\n"
        "loaded = [m for m in sys.modules\n"
        "          if m.startswith('gcsam.toolkit') or m.endswith('.plotting')]\n"
        "assert not loaded, loaded\n"
        "warnings.simplefilter('ignore')\n"
        "try:\n"
        "    gcsam.landscape.plot_contour\n"
        "except ImportError as error:\n"
        "    print('ImportError', error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "ImportError" in done.stdout and "matplotlib" in done.stdout
