"""Backends: how a rewritten cached step is run, and the ``rfc`` dynamo backend.

``make_runner(gm, backend, options)`` turns the flat GraphModule that rewrite.py produces,
``(kwargs, state) -> (output, state')``, into the callable CachedModel calls each step:

* ``"eager"``: the GraphModule itself;
* ``"inductor"``: :class:`SplitCondRunner`: the graph split at its ``torch.cond`` into
  ``pre`` (everything the decision needs) and one ``post`` per branch, each compiled with
  ``torch.compile(fullgraph=True, **options)`` (``mode``, ``dynamic``, ``options``, ... are
  passed through). That is the host-side branch inductor emits for a cond anyway, minus the
  copy of the whole cache that the cond's no-aliasing rule costs every skipped step. With
  ``options["split_cond"] = False`` the one-cond graph is compiled as it is instead.
  CachedModel builds one program per input signature, so with ``optimize(...,
  backend="inductor")`` a new resolution or batch size captures, rewrites and compiles once
  (a fresh cache); a shape seen before reuses its compiled program, with a fresh cache too.
  After the first generation at a shape nothing recompiles.

The plugin form is a dynamo backend, registered as ``"rfc"`` through the
``torch_dynamo_backends`` entry point (pyproject.toml; torch looks it up the first time a
backend name is not one of its own), or explicitly with :func:`register`::

    compiled = torch.compile(model, backend="rfc", fullgraph=True,
                             options={"config": RFCConfig(mode="rfc", threshold=0.1)})

How it works: dynamo hands the backend the FX graph of the user's frame (torch-level ops,
every parameter a graph input, ``nn_module_stack`` metadata on every node). The backend
runs the same passes as :func:`rfc_compile.optimize` on *that* graph (find regions ->
rewrite with one ``torch.cond`` per step -> ``make_runner``) and returns a callable that
holds the cache state in a :class:`~rfc_compile.runtime.CacheSession`, so the state
persists across calls, resets when the timestep goes back up (a new generation), and is
never shared between graphs. Programs are keyed by the concrete input signature: with
``dynamic=False`` dynamo recompiles once per new resolution/batch size and each graph gets
its own program and state; with the default ``dynamic=None`` the second shape makes dynamo
recompile once into a shape-generic graph, and from then on the backend builds (rewrites
and compiles) one program per new concrete shape without dynamo recompiling; ``dynamic=True``
gives that graph from the first call (dynamo then also passes modules' float attributes, a
LayerNorm's ``eps``, as 0-d tensors: the backend folds their values into the program). Either
way a shape never sees another shape's state. The branches of a step that a pipeline runs as
separate calls (cond / uncond under diffusers' ``cache_context``, which the backend cannot see)
get a cache each: a call at the previous call's timestep with the same latents is the step's
next branch (:class:`_BranchSessions`, as ``optimize()`` tells them apart); calls at one timestep
with other latents (Heun's two evaluations) are steps of one cache. A graph without
transformer blocks (a piece of a frame split by graph breaks) runs uncached, with a warning.

Options (``torch.compile(..., options={...})``):
    config: the :class:`RFCConfig` (default ``RFCConfig()``).
    backend: how the rewritten step runs: "inductor" (default) or "eager".
    compile_options: passed to torch.compile for the rewritten step (``mode`` given to
        torch.compile itself is forwarded here too).
    auto_reset: a timestep that goes back up starts a new generation (default True).
    handle: an :class:`RFCHandle` to read stats from / reset the compiled model's cache.
"""

from __future__ import annotations

import logging
import operator
import re
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

logger = logging.getLogger(__name__)

BACKENDS = ("eager", "inductor")
_OPTION_KEYS = ("config", "backend", "compile_options", "auto_reset", "handle")


def make_runner(gm: fx.GraphModule, backend: str, options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """The callable that runs one cached step for ``backend`` (see module docstring)."""
    if backend == "eager":
        return gm
    if backend == "inductor":
        options = dict(options or {})
        conds = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond]
        if options.pop("split_cond", True) and len(conds) == 1:
            try:
                return SplitCondRunner(gm, options)
            except NotImplementedError as err:
                logger.info("compiling the cond graph unsplit: %s", err)
        return torch.compile(gm, fullgraph=True, **options)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _is_clone(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.aten.clone.default, torch.clone)


def split_at_cond(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[bool, fx.GraphModule]]:
    """Split a graph with one ``torch.cond`` into ``pre`` and one ``post`` graph per branch.

    ``pre(*flat inputs) -> (pred, *live)`` runs everything the cond does not depend on;
    ``post[b](*live) -> flat outputs`` runs branch ``b`` inlined, then the rest. In the
    predict branch a state tensor returned unchanged was a copy (torch.cond forbids a
    branch output aliasing an input); inlined, the copy is dropped and the input returned.
    """
    nodes = list(gm.graph.nodes)
    (cond,) = [n for n in nodes if n.target is torch.ops.higher_order.cond]
    pred, true_ref, false_ref, operands = cond.args[:4]
    after: set[fx.Node] = {cond}
    for node in nodes:
        if any(a in after for a in node.all_input_nodes):
            after.add(node)
    output = next(n for n in nodes if n.op == "output")
    before = [n for n in nodes if n not in after and n.op != "output"
              and not (n.op == "call_module" and n.target == "_guards_fn")]  # shapes are keyed by the runtime
    live = [n for n in before if n.op != "get_attr" and any(u in after for u in n.users)]

    pre = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in before:
        env[node] = pre.node_copy(node, lambda n: env[n])
    pre.output((env[pred], *(env[n] for n in live)))
    pre_gm = fx.GraphModule(gm, pre, "rfc_pre")
    pre_gm.graph.eliminate_dead_code()
    pre_gm.recompile()

    posts = {}
    for taken, ref in ((True, true_ref), (False, false_ref)):
        branch: fx.GraphModule = getattr(gm, ref.target)
        graph = fx.Graph()
        env = {n: graph.placeholder(n.name) for n in live}
        for node in before:
            if node.op == "get_attr" and node not in (true_ref, false_ref) and any(u in after for u in node.users):
                env[node] = graph.get_attr(node.target)
        benv: dict[fx.Node, Any] = {}
        placeholders = [n for n in branch.graph.nodes if n.op == "placeholder"]
        for ph, operand in zip(placeholders, operands):
            benv[ph] = env[operand]
        results = None
        for node in branch.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                results = [benv[a.args[0]] if _is_clone(a) and a.args[0].op == "placeholder" else benv[a]
                           for a in node.args[0]]
                continue
            if node.op in ("get_attr", "call_module"):
                raise NotImplementedError(f"cond branch with {node.op} nodes")
            benv[node] = graph.node_copy(node, lambda n: benv[n])
        for node in nodes:
            if node not in after or node is cond:
                continue
            if node.op == "output":
                break
            if node.target is operator.getitem and node.args[0] is cond:
                env[node] = results[node.args[1]]
            else:
                env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(fx.node.map_arg(output.args[0], lambda n: env[n]))
        post = fx.GraphModule(gm, graph, f"rfc_post_{str(taken).lower()}")
        post.graph.eliminate_dead_code()
        post.recompile()
        posts[taken] = post
    return pre_gm, posts


class SplitCondRunner:
    """Runs a one-cond cached step as ``pre`` -> host branch -> ``post[pred]``, each piece
    compiled by ``torch.compile(fullgraph=True)``.

    This is what inductor does with a ``torch.cond`` on the host anyway (one ``pred.item()``
    per call), without the copies the cond's no-aliasing rule forces on a skipped step:
    the state it leaves unchanged is passed through as the same tensors.
    """

    def __init__(self, gm: fx.GraphModule, options: dict[str, Any]):
        info = gm.graph._codegen.pytree_info
        self.in_spec, self.out_spec = info.in_spec, info.out_spec
        pre, posts = split_at_cond(gm)
        self.pre = torch.compile(pre, fullgraph=True, **options)
        self.posts = {b: torch.compile(p, fullgraph=True, **options) for b, p in posts.items()}
        self.graphs = (pre, posts)

    def __call__(self, *args, **kwargs):
        from torch.fx._pytree import tree_flatten_spec

        flat = tree_flatten_spec((args, kwargs), self.in_spec)
        pred, *live = self.pre(*flat)
        out = self.posts[bool(pred)](*live)
        return pytree.tree_unflatten(list(out), self.out_spec)


# --- the "rfc" dynamo backend ------------------------------------------------------------


class RFCHandle:
    """Access to what ``torch.compile(..., backend="rfc", options={"handle": h})`` compiled.

    Each dynamo graph (one per input shape with ``dynamic=False``) has its own cache
    session; ``stats`` are those of the session that ran last.
    """

    def __init__(self) -> None:
        self.sessions: list[Any] = []  # runtime.CacheSession, one per compiled graph and branch (cond/uncond)
        self._last: Any = None

    @property
    def stats(self):
        if self._last is None:
            raise RuntimeError("the compiled model has not run yet")
        return self._last.stats

    def reset(self) -> None:
        """Start a new generation in every session."""
        for session in self.sessions:
            session.reset()


_PATH_PART = re.compile(r"(?:\.__dict__\['_modules'\]|\._modules)\['([^']*)'\]")
_ROOT = re.compile(r"^[LG]\['[^']*'\](?:\.|$)")


def _module_path(dynamo_path: str) -> str:
    """``L['self'].__dict__['_modules']['transformer_blocks'].0.attn1`` -> ``transformer_blocks.0.attn1``."""
    return _ROOT.sub("", _PATH_PART.sub(r".\1", dynamo_path))


def _input_name(node: fx.Node) -> str | None:
    """The name of a tensor the frame got as an argument (``hidden_states``), or None (a weight,
    a global). diffusers wraps most transformers' ``forward`` in a ``(*args, **kwargs)`` decorator
    (peft_utils' LoRA scale), so their inputs arrive as ``L['kwargs']['hidden_states']``; a tensor
    inside a dict argument (PixArt's ``added_cond_kwargs['resolution']``) is named by its path."""
    from torch._dynamo.source import DictGetItemSource, GetItemSource, LocalSource

    source = getattr(node.meta.get("grapharg"), "source", None)
    keys: list[str] = []
    while isinstance(source, (DictGetItemSource, GetItemSource)):
        keys.insert(0, str(source.index))
        source = source.base
    if not isinstance(source, LocalSource) or source.local_name == "self":
        return None
    parts = keys if source.local_name == "kwargs" and keys else [source.local_name, *keys]
    return re.sub(r"\W", "_", "_".join(parts))


def _kind(node: fx.Node) -> str:
    """"input" (a tensor argument of the frame), "size" (a SymInt of a shape-generic graph),
    "scalar" (a Python float dynamo passes as a 0-d tensor with ``dynamic=True``: a module's
    ``eps`` or dropout ``p``) or "weight" (a module's parameter/buffer or a global: becomes an
    attribute)."""
    if not isinstance(node.meta.get("example_value"), Tensor):
        return "size"
    if _input_name(node) is not None:
        return "input"
    return "scalar" if getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False) else "weight"


def _is_constant(value: Any) -> bool:
    if isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float)) for v in value)


def _fold_scalars(gm: fx.GraphModule, values: dict[str, Tensor]) -> None:
    """Replace each scalar placeholder (by target) with its value: ``x.item()`` by the Python
    number, any other use by a constant 0-d tensor. Programs are keyed by these values."""
    for node in list(gm.graph.find_nodes(op="placeholder")):
        if node.target not in values:
            continue
        value = values[node.target]
        constant = None
        for user in list(node.users):
            if user.op == "call_method" and user.target == "item":
                user.replace_all_uses_with(value.item())
                gm.graph.erase_node(user)
                continue
            if constant is None:
                with gm.graph.inserting_before(node):
                    constant = gm.graph.get_attr(f"_scalar_{node.target}")
                gm.register_buffer(f"_scalar_{node.target}", value.detach().clone())
            user.replace_input_with(node, constant)
        gm.graph.erase_node(node)
    gm.recompile()


def _specialize(gm: fx.GraphModule) -> None:
    """Fold every value that FakeTensorProp found to be a Python scalar (sizes of a
    shape-generic graph, arithmetic on them) into its users as a constant."""
    graph = gm.graph
    for node in list(graph.nodes):
        value = node.meta.get("val")
        if node.op == "output" or not _is_constant(value):
            continue
        for user in list(node.users):
            user.args = fx.node.map_aggregate(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.node.map_aggregate(user.kwargs, lambda a: value if a is node else a)
        graph.erase_node(node)
    gm.recompile()


class _GraphPrograms:
    """The owner a CacheSession needs (``_normalize``, ``_program_for``) for one dynamo graph.

    The graph is copied once with every weight (parameter, buffer, global tensor) turned
    into a module attribute, as torch.export leaves weights; placeholders keep the frame's
    argument names, so ``hidden_states``/``timestep`` are found as varying inputs and by
    auto-reset. Programs are built per concrete input signature on the first call with it,
    outside dynamo's compile; a shape-generic graph is specialized to the call's sizes.
    """

    def __init__(self, gm: fx.GraphModule, config, backend: str, compile_options: dict[str, Any]):
        self.config, self.backend, self.compile_options = config, backend, compile_options
        self.source = gm
        # dynamo drops the graph args' metadata after the backend returns: read it now
        self._placeholders = list(gm.graph.find_nodes(op="placeholder"))
        kinds = [_kind(p) for p in self._placeholders]
        self._frame = [i for i, k in enumerate(kinds) if k != "weight"]  # inputs, sizes, scalars, in order
        self._scalars = [i for i, k in enumerate(kinds) if k == "scalar"]
        self._inputs = [i for i, k in enumerate(kinds) if k == "input"]
        self._attrs = [i for i, k in enumerate(kinds) if k == "weight"]
        self._names = {i: _input_name(self._placeholders[i]) or self._placeholders[i].name for i in self._frame}
        self._bound: list[Any] | None = None
        self._frame_args: list[Any] = []
        self._scalar_args: dict[str, Tensor] = {}
        self._programs: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        from .passes.patterns import timestep_rises

        #: class names of the modules the graph's nodes were called in
        self._module_classes = {(cls if isinstance(cls, str) else cls.__name__).rsplit(".", 1)[-1]
                                for node in gm.graph.nodes
                                for _, cls in (node.meta.get("nn_module_stack") or {}).values()}
        #: auto-reset's direction (CacheSession reads it), from the blocks the graph calls
        self.timestep_rises = timestep_rises(self._module_classes)

    def timestep_position(self) -> int | None:
        """Where the frame's timestep tensor (runtime.TIMESTEP_NAMES) is among the graph's arguments."""
        from .runtime import TIMESTEP_NAMES

        return next((i for name in TIMESTEP_NAMES for i in self._inputs if self._names[i] == name), None)

    def latent_positions(self) -> dict[str, int]:
        """Where the frame's latents (runtime.LATENT_NAMES) are among the graph's arguments, by name."""
        from .runtime import LATENT_NAMES

        return {self._names[i]: i for i in self._inputs if self._names[i] in LATENT_NAMES}

    def _check_latents_are_inputs(self) -> None:
        """A graph holding blocks but not the model's latents or timestep among its inputs is a piece
        of the forward after a graph break: nothing in it can tell what changes between steps."""
        from .errors import UnsupportedModelError
        from .passes.patterns import DEFAULT_VARYING_INPUTS

        names = [self._names[i] for i in self._inputs]
        if not any(name in DEFAULT_VARYING_INPUTS for name in names):
            raise UnsupportedModelError(
                f"the rfc torch.compile backend got a graph whose inputs ({', '.join(names) or 'none'}) include "
                f"neither the latents nor the timestep ({', '.join(DEFAULT_VARYING_INPUTS)}): dynamo split the "
                "model's forward at a graph break before its blocks (torch._dynamo.explain(model)(...) says where; "
                "compile with fullgraph=True to see it as an error). rfc_compile.optimize(model, config, "
                "backend='inductor') captures the whole forward with torch.export instead")

    def has_blocks(self) -> bool:
        from .passes.patterns import BLOCK_PATTERNS

        return bool(self._module_classes & set(BLOCK_PATTERNS))

    def _bind(self, attrs: list[Any]) -> None:
        """Copy the graph with these weights as attributes (again if dynamo passes new ones)."""
        graph, env, root = fx.Graph(), {}, torch.nn.Module()
        attr_nodes = dict(zip([self._placeholders[i] for i in self._attrs], attrs))
        frame_names = {self._placeholders[i]: self._names[i] for i in self._frame}
        for node in self.source.graph.nodes:
            if node.op == "placeholder" and node in attr_nodes:
                name = f"w{len(root._parameters) + len(root._buffers)}"
                value = attr_nodes[node]
                if isinstance(value, torch.nn.Parameter):
                    root.register_parameter(name, value)
                else:
                    root.register_buffer(name, value)
                env[node] = graph.get_attr(name)
            elif node.op == "placeholder":
                env[node] = graph.placeholder(frame_names[node])
            else:
                env[node] = graph.node_copy(node, lambda n: env[n])
            meta = dict(node.meta)
            stack = meta.pop("nn_module_stack", None)
            if stack and node.op != "placeholder":  # weights carry their module's stack; no region's
                meta["nn_module_stack"] = {k: (_module_path(p), c) for k, (p, c) in stack.items()}
            env[node].meta = meta
        self.gm = fx.GraphModule(root, graph)
        self._bound = list(attrs)
        self._programs.clear()

    def _normalize(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = self._bound
        if bound is None or any(args[i] is not w for i, w in zip(self._attrs, bound)):
            with self._lock:
                self._bind([args[i] for i in self._attrs])
        self._frame_args = [args[i] for i in self._frame]  # sizes too, for a build
        self._scalar_args = {self._names[i]: args[i] for i in self._scalars}
        return {self._names[i]: args[i] for i in self._inputs}

    def _program_for(self, call: dict[str, Any]) -> tuple[tuple, Any]:
        from .runtime import _input_key

        # the sizes follow from the tensors' shapes; scalars are folded into the program
        key = (_input_key(call), tuple((n, v.item()) for n, v in self._scalar_args.items()))
        with self._lock:
            if key not in self._programs:
                self._programs[key] = self._build(call)
            return key, self._programs[key]

    def _build(self, call: dict[str, Any]):
        from torch._subclasses.fake_tensor import (
            DataDependentOutputException,
            DynamicOutputShapeException,
            FakeTensorMode,
        )
        from torch.fx.experimental.proxy_tensor import disable_autocast_cache
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        from .errors import UnsupportedModelError

        from .passes import CapturedGraph, find_regions, rewrite
        from .runtime import _Program

        graph = fx.Graph()
        graph.output(graph.graph_copy(self.gm.graph, {}))
        gm = fx.GraphModule(self.gm, graph)
        _fold_scalars(gm, self._scalar_args)
        frame_args = [a for i, a in zip(self._frame, self._frame_args) if i not in self._scalars]
        # concrete metadata for these inputs, then sizes folded in as constants
        try:  # under autocast, casting a real weight in fake mode would cache a fake copy of it for the real run
            with disable_autocast_cache():
                FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*frame_args)
        except (DynamicOutputShapeException, DataDependentOutputException) as exc:
            raise UnsupportedModelError(
                f"the rfc torch.compile backend cannot follow this graph's data-dependent shapes "
                f"({str(exc).splitlines()[0]}; e.g. "
                "Mochi's nonzero over its text mask); rfc_compile.optimize(model, config, backend='inductor') "
                "captures it with torch.export instead") from exc
        _specialize(gm)
        outputs = next(iter(gm.graph.find_nodes(op="output"))).args[0]
        captured = CapturedGraph(gm, pytree.tree_structure(((), call)),
                                 pytree.tree_structure(tuple(range(len(outputs)))), list(call))
        self._check_latents_are_inputs()
        plan = find_regions(gm)
        if self.config.mode == "full":
            plan = None
        step_gm, step = rewrite(captured, plan, self.config, call)
        run = make_runner(step_gm, self.backend, self.compile_options)
        return _Program(run, step.state_spec, step_gm, len(plan.regions) if plan else 0)


def rfc_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                mode: str | None = None) -> Callable[..., Any]:
    """The ``rfc`` dynamo backend (see module docstring for the options)."""
    from .config import RFCConfig
    from .passes.patterns import BLOCK_PATTERNS

    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown rfc backend options {unknown}; known: {list(_OPTION_KEYS)}")
    config = options.get("config") or RFCConfig()
    if not isinstance(config, RFCConfig):
        raise TypeError(f"options['config'] must be an RFCConfig, got {type(config).__name__}")
    backend = options.get("backend", "inductor")
    if backend not in BACKENDS:
        raise ValueError(f"options['backend'] must be one of {BACKENDS}, got {backend!r}")
    compile_options = dict(options.get("compile_options") or {})
    if mode is not None:
        compile_options.setdefault("mode", mode)

    owner = _GraphPrograms(gm, config, backend, compile_options)
    if not owner.has_blocks():
        warnings.warn("rfc backend: this graph holds no known transformer block and runs uncached "
                      f"(known blocks: {sorted(BLOCK_PATTERNS)})", stacklevel=2)
        if backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward

    return _BranchSessions(owner, options.get("auto_reset", True), options.get("handle"))


class _BranchSessions:
    """The compiled callable: one cache per branch of a denoising step.

    Pipelines that call the transformer separately for the conditional and unconditional
    branches (WanPipeline with CFG, true CFG) make them consecutive calls at one timestep with
    the same latents, and tell caches apart with diffusers' ``cache_context``, which a dynamo
    backend cannot see (the pipeline enters it on the original module, outside the graph). So
    :class:`~rfc_compile.runtime.BranchFollower` reads the branch from the frame's latents and
    timestep, as ``optimize()`` does outside ``cache_context``: branch k uses cache k. A pipeline
    with one call per step (CFG batched, or none), or a second-order sampler's two evaluations at
    one timestep (other latents), uses one cache.
    """

    def __init__(self, owner: _GraphPrograms, auto_reset: bool, handle: RFCHandle | None):
        from .runtime import BranchFollower, CacheSession, timestep_value

        self._new_session = lambda: CacheSession(owner, auto_reset)
        self._timestep_value = timestep_value
        self._timestep_at = owner.timestep_position()
        self._latents_at = owner.latent_positions()
        self._handle = handle
        self._sessions: list[Any] = []
        self._branches = BranchFollower()
        self._lock = threading.Lock()

    def _session_for(self, args: tuple) -> Any:
        with self._lock:
            value = self._timestep_value(args[self._timestep_at] if self._timestep_at is not None else None)
            branch = self._branches.branch({name: args[i] for name, i in self._latents_at.items()}, value)
            while len(self._sessions) <= branch:
                self._sessions.append(self._new_session())
                if self._handle is not None:
                    self._handle.sessions.append(self._sessions[-1])
            return self._sessions[branch]

    def __call__(self, *args):
        session = self._session_for(args)
        if self._handle is not None:
            self._handle._last = session
        return session(*args)


def register() -> None:
    """Register ``rfc`` with dynamo now (the entry point does it on first use when installed)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "rfc" not in _COMPILER_FNS:
        register_backend(rfc_backend, name="rfc")
