"""Architecture promises a user can see: a check leaves the user's Case as it was written (its
module seed and built module ride on the points of one check), and a wrong-shaped gradient is
diagnosed once (the message states the shape, the hint the rule it breaks)."""
from __future__ import annotations

import ast
import io
import threading
from pathlib import Path
from typing import Any

import torch

import backprop_check
from backprop_check import case, run
from backprop_check.commands.explain import explain
from backprop_check.commands.trace import Settings, Trace
from backprop_check.model.forward import call_forward
from backprop_check.model.points import given_point, random_point

CPU64 = dict(devices=["cpu"], dtypes=["float64"], points=1)
X = [1.0, 2.0, 3.0]


class Shifted(torch.nn.Module):
    """A module whose state besides its parameters (the buffer `shift`) is drawn at build time:
    the loss depends on which seed built it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3))
        self.register_buffer("shift", torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y_hat = self.weight * x + self.shift
        return (y_hat**2).sum()


def shifted_case(before_forward: Any = None) -> Any:
    @case(module=Shifted, data={"x": X})
    def shifted(model: Shifted, x: torch.Tensor) -> torch.Tensor:
        if before_forward is not None:
            before_forward()
        return model(x)

    @shifted.manual
    def shifted_manual(model: Shifted, x: torch.Tensor) -> dict[str, torch.Tensor]:
        dloss_dy_hat = 2 * (model.weight * x + model.shift)
        return {"weight": dloss_dy_hat * x}  # dy_hat/dweight = x

    return shifted


def reference(report: Any) -> dict[str, Any]:
    (result,) = report.results
    assert result.verdict == "ok", result.message
    return result.reference


def test_a_check_leaves_the_users_case_as_it_was_written() -> None:
    shifted = shifted_case()
    written = dict(vars(shifted))
    run(shifted, seed=3, **CPU64)
    assert vars(shifted).keys() == written.keys()
    assert all(vars(shifted)[k] is v for k, v in written.items())


def test_a_point_keeps_the_module_of_its_own_seed_after_another_seed_is_drawn() -> None:
    shifted = shifted_case()
    first = given_point(shifted, 1)
    loss = call_forward(shifted, first)[0]
    second = given_point(shifted, 2)  # once, this rewrote the seed every forward pass read back
    assert torch.equal(call_forward(shifted, first)[0], loss)
    assert not torch.equal(call_forward(shifted, second)[0], loss)
    assert first.module is not second.module
    assert first.module.seed != second.module.seed


def test_random_points_and_casts_share_the_given_points_module() -> None:
    shifted = shifted_case()
    given = given_point(shifted, 1)
    assert random_point(shifted, given, 1, 1).module is given.module
    assert given.cast(torch.float32).module is given.module
    assert given.rounded(torch.float32).module is given.module


def test_one_case_checked_twice_with_two_seeds_is_two_independent_checks() -> None:
    shifted = shifted_case()
    one = reference(run(shifted, seed=1, **CPU64))
    two = reference(run(shifted, seed=2, **CPU64))
    assert reference(run(shifted, seed=1, **CPU64)) == one
    assert one["loss"] != two["loss"]


def test_two_runs_of_one_case_at_once_give_what_each_gives_alone() -> None:
    # Each run's first forward pass waits until the other run has drawn its given point (and
    # built its module): a seed kept on the shared Case would then be the other run's.
    meet = threading.Barrier(2, timeout=60)
    waiting = threading.local()

    def before_forward() -> None:
        if getattr(waiting, "first", False):
            waiting.first = False
            meet.wait()

    shifted = shifted_case(before_forward)
    alone = {seed: reference(run(shifted, seed=seed, **CPU64)) for seed in (1, 2)}
    together: dict[int, Any] = {}

    def check(seed: int) -> None:
        waiting.first = True
        together[seed] = run(shifted, seed=seed, **CPU64)

    threads = [threading.Thread(target=check, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert {seed: reference(report) for seed, report in together.items()} == alone


def test_a_module_case_replays_in_trace_and_draws_in_explain() -> None:
    shifted = shifted_case()
    replay = Trace(shifted, Settings(epochs=2, lr=0.01, dtype="float64"))
    replay.run(io.StringIO())
    assert (replay.exit_code, len(replay.steps)) == (0, 2)
    lines, status = explain(shifted, seed=0)
    assert status == 0
    assert any(line.lstrip().startswith("weight[") for line in lines), lines


def column_bias_case() -> Any:
    """h = W·X + b over the columns of X (4 samples), b a column of shape (2, 1)."""

    @case(
        params={"W": lambda g: torch.randn(2, 3, generator=g, dtype=torch.float64), "b": [[0.5], [-1.0]]},
        data={"X": lambda g: torch.randn(3, 4, generator=g, dtype=torch.float64)},
    )
    def column_bias(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return ((W @ X + b) ** 2).sum()

    @column_bias.manual
    def column_bias_manual(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor) -> dict[str, torch.Tensor]:
        dloss_dh = 2 * (W @ X + b)
        return {"W": dloss_dh @ X.T, "b": dloss_dh}  # b: the per-sample shares, never summed

    return column_bias


def transposed_case() -> Any:
    @case(
        params={"W": lambda g: torch.randn(2, 3, generator=g, dtype=torch.float64)},
        data={"x": [1.0, -2.0, 0.5]},
    )
    def transposed(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return ((W @ x) ** 2).sum()

    @transposed.manual
    def transposed_manual(W: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"W": torch.outer(x, 2 * (W @ x))}  # the chain multiplied in the wrong order

    return transposed


def shared_words(first: str, second: str, length: int = 3) -> set[tuple[str, ...]]:
    """The runs of `length` words that both texts say."""

    def runs(text: str) -> set[tuple[str, ...]]:
        words = text.replace(",", " ").replace(";", " ").replace(":", " ").split()
        return {tuple(words[i : i + length]) for i in range(len(words) - length + 1)}

    return runs(first) & runs(second)


def test_a_kept_batch_dimension_is_stated_in_the_message_and_explained_in_the_hint() -> None:
    (result,) = run(column_bias_case(), **CPU64).results
    assert (result.verdict, result.culprit) == ("mismatch", "manual")
    assert result.message.startswith(
        "manual is the odd one out at the given point: b: manual gradient has shape (2, 4), expected (2, 1): "
        "a missing sum over the batch dimension; summed over it, it matches the reference"
    )
    assert result.hints == ["b is shared by all 4 samples, so dloss/db is the sum of their per-sample shares"]


def test_a_wrong_shape_is_said_once_the_message_and_the_hint_share_no_phrase() -> None:
    for target in (column_bias_case(), transposed_case()):
        (result,) = run(target, **CPU64).results
        (hint,) = result.hints
        assert "shape (" not in hint and "matches" not in hint
        assert shared_words(result.message, hint) == set(), (result.message, hint)


# --- the floors: the package's structure, read from its source --------------------------------

PACKAGE = Path(backprop_check.__file__).parent

# Bottom to top: a module imports from its own floor or from below, never from above, and a
# folder never from another folder of its floor. README.md's Layout section says the same.
FLOORS = (
    ("errors", "dtypes", "version", "selection", "limits", "records", "options"),  # the vocabulary
    ("model",),  # what the user wrote: cases, functions, layers, points, the forward call
    ("sources",),  # the gradients: manual, numerical, autograd (and the replay they use)
    ("diagnosis", "formats"),  # reading a disagreement; writing a report
    ("engine",),  # the check: guards, tolerance, comparison, verdicts, contract, orders, modes
    ("commands",),  # what a user calls: the Python API, the CLI, the pytest session, the drop-in
    ("", "plugin", "console", "__main__"),  # the package's API, the entry points
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(name: str, path: Path) -> set[str]:
    """The package's modules that `name` imports, at the top or inside functions; an import under
    `if TYPE_CHECKING:` is for the type checker only and left out."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                above = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(above + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    """Module → the modules it imports; a package's `__init__` filling its registry from its own
    submodules is not an edge (the one allowed loop)."""
    edges = {}
    for name, path in MODULES.items():
        edges[name] = {
            target for target in imported(name, path)
            if not (path.name == "__init__.py" and name != "backprop_check" and target.startswith(name + "."))
        }
    return edges


def unit(name: str) -> str:
    """The folder a module lives in, or the module itself at the top of the package."""
    parts = name.split(".")[1:]
    return parts[0] if parts else ""


def floor(name: str) -> int:
    for level, units in enumerate(FLOORS):
        if unit(name) in units:
            return level
    raise AssertionError(f"{name} is on no floor: add its folder to FLOORS (and to README's Layout)")


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `edges`, as the path that closes it, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_of_the_package_is_on_a_floor() -> None:
    for name in MODULES:
        floor(name)


def test_no_module_imports_from_a_floor_above_or_from_another_folder_of_its_floor() -> None:
    wrong = [
        f"{name} → {target}"
        for name, targets in graph().items()
        for target in sorted(targets)
        if floor(target) > floor(name) or (floor(target) == floor(name) and unit(target) != unit(name) and floor(name) not in (0, len(FLOORS) - 1))
    ]
    assert not wrong, "imports against the floors:\n" + "\n".join(wrong)


def test_no_import_cycle_between_files() -> None:
    assert cycle(graph()) is None, " → ".join(cycle(graph()) or [])


def test_no_import_cycle_between_folders() -> None:
    folders: dict[str, set[str]] = {}
    for name, targets in graph().items():
        folders.setdefault(unit(name), set()).update(unit(t) for t in targets if unit(t) != unit(name))
    assert cycle(folders) is None, " → ".join(cycle(folders) or [])


def test_the_cycle_finder_finds_a_cycle_and_the_import_reader_reads_lazy_imports() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    # An import inside a function is an edge as much as one at the top of the file.
    inside = [
        name for name, path in MODULES.items()
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) for f in ast.walk(ast.parse(path.read_text()))
               if isinstance(f, ast.FunctionDef) for n in ast.walk(f))
    ]
    assert inside, "no module imports inside a function: the reader's lazy-import path is untested"
    some = inside[0]
    lazy = {
        target for f in ast.walk(ast.parse(MODULES[some].read_text())) if isinstance(f, ast.FunctionDef)
        for n in ast.walk(f) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("backprop_check")
        for target in [n.module]
    }
    assert {t for t in lazy if t in MODULES} <= imported(some, MODULES[some])


def test_a_module_that_cannot_be_deep_copied_is_built_again_for_each_dtype() -> None:
    # The hook-based torch.nn.utils.weight_norm keeps `weight` as a tensor that is no leaf: deepcopy
    # refuses it ("Only Tensors created explicitly by the user ... support the deepcopy protocol").
    import warnings

    from backprop_check import case, run

    def model() -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.nn.Sequential(torch.nn.utils.weight_norm(torch.nn.Linear(4, 3)), torch.nn.Tanh(), torch.nn.Linear(3, 1))

    @case(module=model, data={"x": lambda g: torch.randn(5, 4, generator=g)})
    def wn_old(model, x):  # noqa: ANN001, ANN202
        return model(x).pow(2).mean()

    report = run([wn_old], devices=["cpu"], dtypes=["float64", "float32"], points=1)
    assert [str(r.verdict) for r in report.results] == ["ok", "ok"], [r.message for r in report.results]
