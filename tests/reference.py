"""An independent, plain-PyTorch implementation of RFC_METHOD.md, for tests only.

It shares no code with rfc_compile: it patches the real region modules' ``forward`` with
Python wrappers that decide with Python control flow, keep ladders in Python lists and take
per-sample norms one sample at a time. If the traced graph and this disagree, one of them
is not the method.
"""

from __future__ import annotations

import math

import torch


def _norm(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Per-sample norm, one sample at a time, in float64 (then float32)."""
    return torch.stack([x[b].double().abs().pow(p).sum().pow(1.0 / p) for b in range(x.shape[0])]).float()


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class _RegionState:
    def __init__(self) -> None:
        self.ladders: list[list[torch.Tensor]] = []  # per output: [D0, D1, ...]
        self.ratios: list[torch.Tensor] = []
        self.cos: list[torch.Tensor] = []
        self.x_last: list[torch.Tensor] | None = None


class ReferenceRFC:
    """Wraps region modules of ``model``; call ``begin_step()`` before every model call.

    ``regions``: list of (name, module, feature_arg_names) where feature_arg_names lists the
    module's forward arguments (positional index or kwarg name) that make up X.
    """

    def __init__(self, regions, mode: str, order: int = 2, threshold: float = 0.1, warmup_steps: int = 2,
                 max_interval: int | None = None, interval: int = 4, eps: float = 1e-6,
                 rfe_shrink: bool = False, num_steps: int | None = None, final_full_steps: int = 0):
        self.mode, self.threshold, self.warmup = mode, threshold, warmup_steps
        self.shrink = rfe_shrink
        self.final_from = num_steps - final_full_steps if final_full_steps else None
        self.max_interval, self.interval, self.eps = max_interval, interval, eps
        self.order = 0 if mode in ("fora", "full") else order
        self.regions = regions
        self.full_steps: list[int] = []
        self.step = -1
        self.is_full = True
        self.state = {name: _RegionState() for name, _, _ in regions}
        self.watch_ladder: list[list[torch.Tensor]] = []
        self.acc: torch.Tensor | None = None
        for name, module, features in regions:
            self._patch(name, module, features, first=(name == regions[0][0]))

    # --- schedule -------------------------------------------------------------------

    def begin_step(self) -> None:
        self.step += 1

    @property
    def last_full(self) -> int | None:
        return self.full_steps[-1] if self.full_steps else None

    def _taylor(self, ladder: list[torch.Tensor], k: int, d: int | None = None) -> torch.Tensor:
        if d is None:
            d = min(self.order, len(self.full_steps) - 1)
        out = torch.zeros_like(ladder[0], dtype=torch.float32)
        for i in range(1, d + 1):
            out = out + (k**i / math.factorial(i)) * ladder[i].float()
        return out

    def _decide(self, xs: list[torch.Tensor]) -> bool:
        n = self.step
        if self.mode == "full":
            return True
        if not self.full_steps or n < self.warmup:
            forced = True
        else:
            k = n - self.last_full
            forced = self.max_interval is not None and k > self.max_interval
            if self.mode != "rfc":
                forced = forced or k >= self.interval
        if self.final_from is not None and n >= self.final_from:
            forced = True
        if self.mode != "rfc":
            return forced
        # RCS: accumulate the relative L1 error of the watched input's Taylor prediction
        batch = xs[0].shape[0]
        if self.acc is None:
            self.acc = torch.zeros(batch)
        if self.watch_ladder:
            k = n - self.last_full
            num = sum(_norm(x.float() - (lad[0].float() + self._taylor(lad, k)), 1.0)
                      for x, lad in zip(xs, self.watch_ladder))
        else:
            num = sum(_norm(x.float(), 1.0) for x in xs)
        den = torch.clamp(sum(_norm(x.float(), 1.0) for x in xs), min=self.eps)
        self.acc = self.acc + num / den
        full = forced or bool((self.acc > self.threshold).any())
        if full:
            self.acc = torch.zeros(batch)
        return full

    @staticmethod
    def _gap(n: int, previous: list[int]) -> float:
        """TaylorSeer's divisor of every D_i: the latest gap (1 before any previous full step)."""
        return float(n - previous[-1]) if previous else 1.0

    @staticmethod
    def _new_ladder(old: list[torch.Tensor] | None, value: torch.Tensor, gap: float, depth: int, order: int):
        new = [value.clone()]
        for i in range(1, order + 1):
            if i <= depth:
                new.append(((new[i - 1].float() - old[i - 1].float()) / gap).to(value.dtype))
            else:
                new.append(torch.zeros_like(value))
        return new

    def _agreement(self, old_ladder: list[torch.Tensor], y: torch.Tensor, seen_before: int) -> torch.Tensor:
        """Per-sample cos between the old ladder's Taylor term over the gap and the true change."""
        gap = self.step - self.full_steps[-2]
        t = self._taylor(old_ladder, gap, d=min(self.order, seen_before - 1))
        change = y.float() - old_ladder[0].float()
        out = []
        for b in range(y.shape[0]):
            tb, cb = t[b].double().flatten(), change[b].double().flatten()
            norms = tb.norm() * cb.norm()
            out.append(1.0 if norms <= self.eps else float(min(max(tb @ cb / norms, 0.0), 1.0)))
        return torch.tensor(out, dtype=torch.float32)

    # --- region wrappers --------------------------------------------------------------

    def _patch(self, name, module, features, first: bool) -> None:
        original = module.forward

        def features_of(args, kwargs):
            return [args[f] if isinstance(f, int) else kwargs[f] for f in features]

        def wrapped(*args, **kwargs):
            xs = features_of(args, kwargs)
            if first:
                self.is_full = self._decide(xs)
                if self.is_full:
                    gap = self._gap(self.step, self.full_steps)
                    depth = min(self.order, len(self.full_steps))
                    if self.mode == "rfc":
                        old = self.watch_ladder or [None] * len(xs)
                        self.watch_ladder = [self._new_ladder(o, x, gap, depth, self.order)
                                             for o, x in zip(old, xs)]
                    self.full_steps.append(self.step)
            st = self.state[name]
            if self.is_full:
                out = original(*args, **kwargs)
                ys = list(out) if isinstance(out, tuple) else [out]
                seen_before = len(self.full_steps) - 1
                gap = self._gap(self.step, self.full_steps[:-1])
                depth = min(self.order, seen_before)
                if self.mode in ("rfe", "rfc") and seen_before:
                    dx = torch.sqrt(sum(_norm(x - xl) ** 2 for x, xl in zip(xs, st.x_last)))
                    st.ratios = [_norm(y - lad[0]) / torch.clamp(dx, min=self.eps)
                                 for y, lad in zip(ys, st.ladders)]
                if self.shrink:
                    st.cos = [self._agreement(lad, y, seen_before) if seen_before else torch.ones(y.shape[0])
                              for y, lad in zip(ys, st.ladders or [None] * len(ys))]
                old = st.ladders or [None] * len(ys)
                st.ladders = [self._new_ladder(o, y, gap, depth, self.order) for o, y in zip(old, ys)]
                st.x_last = [x.clone() for x in xs]
                return out
            k = self.step - self.last_full
            preds = []
            for o, lad in enumerate(st.ladders):
                t = self._taylor(lad, k)
                if self.mode in ("rfe", "rfc"):
                    s = st.ratios[o] * st.cos[o] if self.shrink else st.ratios[o]
                    dx = torch.sqrt(sum(_norm(x - xl) ** 2 for x, xl in zip(xs, st.x_last)))
                    direction = t / _bcast(torch.clamp(_norm(t), min=self.eps), t)
                    y = lad[0].float() + _bcast(s * dx, t) * direction
                else:
                    y = lad[0].float() + t
                preds.append(y.to(lad[0].dtype))
            return tuple(preds) if len(preds) > 1 else preds[0]

        module.forward = wrapped


def dit_regions(model, blocks=None) -> list:
    """The DiT/PixArt regions (and Cosmos', Hunyuan-DiT's ``blocks``): each block's attn1, attn2 (if
    any), ff; X = arg 0."""
    regions = []
    for i, block in enumerate(model.transformer_blocks if blocks is None else blocks):
        regions.append((f"{i}.attn1", block.attn1, [0]))
        if block.attn2 is not None:
            regions.append((f"{i}.attn2", block.attn2, [0]))
        regions.append((f"{i}.ff", block.ff, [0]))
    return regions


# --- [models] region lists per diffusers family ------------------------------------------------
#
# Each list starts with the region the model calls first (RCS watches it). Joint attention
# regions take X = (image stream, text stream) and return both streams. Single-stream blocks
# (FLUX, HunyuanVideo) cache proj_mlp + attn + proj_out as one region: their block forward is
# re-implemented below in plain PyTorch around a region module, so a predicted step runs the
# block's norm, gate and residual but not proj_out.


class _SingleStreamRegion(torch.nn.Module):
    """The fused MLP + attention + proj_out region of a single-stream block, as a module to patch."""

    def __init__(self, block, split_text: bool, swiglu: bool = False):
        super().__init__()
        object.__setattr__(self, "block", block)  # not a submodule: no parameter aliasing
        self.split_text = split_text
        self.swiglu = swiglu

    def forward(self, norm_x, text_len, attention_mask, rotary):
        b = self.block
        if self.swiglu:  # Ovis-Image: proj_mlp gives the values and their gates
            values, gates = b.proj_mlp(norm_x).chunk(2, dim=-1)
            mlp = b.act_mlp(gates) * values
        else:
            mlp = b.act_mlp(b.proj_mlp(norm_x))
        if self.split_text:  # HunyuanVideo: image tokens first, text last; attn returns both
            img, txt = b.attn(hidden_states=norm_x[:, :-text_len], encoder_hidden_states=norm_x[:, -text_len:],
                              attention_mask=attention_mask, image_rotary_emb=rotary)
            attn = torch.cat([img, txt], dim=1)
        else:  # FLUX: text first, one attention over the joint sequence
            attn = b.attn(hidden_states=norm_x, image_rotary_emb=rotary)
        return b.proj_out(torch.cat([attn, mlp], dim=2))


def _patch_flux_single(block, swiglu: bool = False) -> torch.nn.Module:
    region = _SingleStreamRegion(block, split_text=False, swiglu=swiglu)

    def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, **attention_kwargs):
        text_len = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        norm_x, gate = block.norm(x, emb=temb)
        x = x + gate.unsqueeze(1) * region(norm_x, text_len, None, image_rotary_emb)
        return x[:, :text_len], x[:, text_len:]

    block.forward = forward
    return region


def _patch_fibo_single(block) -> torch.nn.Module:
    """Bria FIBO's single block: FLUX's, on the joint (text, image) sequence the model builds."""
    region = _SingleStreamRegion(block, split_text=False)

    def forward(hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        norm_x, gate = block.norm(hidden_states, emb=temb)
        return hidden_states + gate.unsqueeze(1) * region(norm_x, 0, None, image_rotary_emb)

    block.forward = forward
    return region


class _MotifSingleRegion(torch.nn.Module):
    """Motif-Video's single block region: MLP, joint attention (video first), the text cross-attention
    on its video output (decoder blocks have none), proj_out."""

    def __init__(self, block):
        super().__init__()
        object.__setattr__(self, "block", block)

    def forward(self, norm_x, text_len, attention_mask, rotary, image_embed_seq_len):
        b = self.block
        mlp = b.act_mlp(b.proj_mlp(norm_x))
        video, text = norm_x[:, :-text_len], norm_x[:, -text_len:]
        attn, context = b.attn(hidden_states=video, encoder_hidden_states=text, attention_mask=attention_mask,
                               image_rotary_emb=rotary)
        if b.cross_attn is not None:
            attn = attn + b.cross_attn(hidden_states=attn, encoder_hidden_states=text, attention_mask=attention_mask,
                                       image_rotary_emb=rotary, image_embed_seq_len=image_embed_seq_len)
        return b.proj_out(torch.cat([torch.cat([attn, context], dim=1), mlp], dim=2))


def _patch_motif_single(block) -> torch.nn.Module:
    region = _MotifSingleRegion(block)

    def forward(hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None,
                image_embed_seq_len=0):
        text_len = encoder_hidden_states.shape[1]
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        norm_x, gate = block.norm(x, emb=temb)
        x = gate.unsqueeze(1) * region(norm_x, text_len, attention_mask, image_rotary_emb, image_embed_seq_len) + x
        return x[:, :-text_len], x[:, -text_len:]

    block.forward = forward
    return region


def motif_video_regions(model) -> list:
    """Motif-Video: double blocks' joint attn (X = both streams), the text cross_attn (X = attn's video
    output and the modulated text), ff, ff_context; single blocks' fused region."""
    regions = []
    for i, block in enumerate(model.transformer_blocks):
        regions.append((f"d{i}.attn", block.attn, _JOINT))
        if block.cross_attn is not None:
            regions.append((f"d{i}.cross_attn", block.cross_attn, _JOINT))
        regions += [(f"d{i}.ff", block.ff, [0]), (f"d{i}.ff_context", block.ff_context, [0])]
    return regions + [(f"s{i}.mlp_attn", _patch_motif_single(block), [0])
                      for i, block in enumerate(model.single_transformer_blocks)]


def _patch_hunyuan_single(block) -> torch.nn.Module:
    region = _SingleStreamRegion(block, split_text=True)

    def forward(hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None,
                *args, **kwargs):
        text_len = encoder_hidden_states.shape[1]
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        norm_x, gate = block.norm(x, emb=temb)
        x = gate.unsqueeze(1) * region(norm_x, text_len, attention_mask, image_rotary_emb) + x
        return x[:, :-text_len], x[:, -text_len:]

    block.forward = forward
    return region


_JOINT = ["hidden_states", "encoder_hidden_states"]


def _double_stream(blocks, prefix: str = "d") -> list:
    """FLUX-style double-stream blocks: joint attn (X = both streams), ff, ff_context."""
    return [region for i, block in enumerate(blocks)
            for region in ((f"{prefix}{i}.attn", block.attn, _JOINT), (f"{prefix}{i}.ff", block.ff, [0]),
                           (f"{prefix}{i}.ff_context", block.ff_context, [0]))]


def _wan_blocks(blocks, prefix: str = "") -> list:
    """Wan-style blocks: attn1, attn2, ffn, each with X = its first argument."""
    return [region for i, block in enumerate(blocks)
            for region in ((f"{prefix}{i}.attn1", block.attn1, [0]), (f"{prefix}{i}.attn2", block.attn2, [0]),
                           (f"{prefix}{i}.ffn", block.ffn, [0]))]


def flux_regions(model, swiglu: bool = False) -> list:
    """FLUX (and LongCat-Image, Ovis-Image, Bria): double blocks' joint attn (X = both streams), ff,
    ff_context; single blocks' fused region (Ovis-Image's MLP a SwiGLU)."""
    regions = _double_stream(model.transformer_blocks)
    for i, block in enumerate(model.single_transformer_blocks):
        regions.append((f"s{i}.mlp_attn", _patch_flux_single(block, swiglu), [0]))
    return regions


def flux3_regions(model) -> list:
    """FLUX.3: the image mode blocks' and the joint single blocks' attn and ff (parallel, on one
    modulated input); the text mode blocks run at t = 0 (constant: not cached)."""
    regions = []
    for part, blocks in (("image", model.mode_blocks["image"]), ("single", model.single_transformer_blocks)):
        for i, block in enumerate(blocks):
            regions += [(f"{part}{i}.attn", block.attn, ["hidden_states"]), (f"{part}{i}.ff", block.ff, [0])]
    return regions


def hunyuan_video_regions(model) -> list:
    """HunyuanVideo: FLUX-like double and single blocks (the token refiner is not cached)."""
    regions = _double_stream(model.transformer_blocks)
    for i, block in enumerate(model.single_transformer_blocks):
        regions.append((f"s{i}.mlp_attn", _patch_hunyuan_single(block), [0]))
    return regions


def sd3_regions(model) -> list:
    """SD3/SD3.5: joint attn, attn2 (dual-attention blocks), ff, ff_context (not in the last block)."""
    regions = []
    for i, block in enumerate(model.transformer_blocks):
        regions.append((f"{i}.attn", block.attn, _JOINT))
        if block.attn2 is not None:
            regions.append((f"{i}.attn2", block.attn2, ["hidden_states"]))
        regions.append((f"{i}.ff", block.ff, [0]))
        if block.ff_context is not None:
            regions.append((f"{i}.ff_context", block.ff_context, [0]))
    return regions


def wan_regions(model) -> list:
    return _wan_blocks(model.blocks)


def cogvideox_regions(model) -> list:
    regions = []
    for i, block in enumerate(model.transformer_blocks):
        regions += [(f"{i}.attn1", block.attn1, _JOINT), (f"{i}.ff", block.ff, [0])]
    return regions


def ltx_video_regions(model) -> list:
    regions = []
    for i, block in enumerate(model.transformer_blocks):
        regions += [(f"{i}.attn1", block.attn1, ["hidden_states"]), (f"{i}.attn2", block.attn2, [0]),
                    (f"{i}.ff", block.ff, [0])]
    return regions


class _ChromaSingleRegion(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        object.__setattr__(self, "block", block)

    def forward(self, norm_x, attention_mask, rotary):
        b = self.block
        mlp = b.act_mlp(b.proj_mlp(norm_x))
        if attention_mask is not None:
            attention_mask = attention_mask[:, None, None, :] * attention_mask[:, None, :, None]
        attn = b.attn(hidden_states=norm_x, image_rotary_emb=rotary, attention_mask=attention_mask)
        return b.proj_out(torch.cat([attn, mlp], dim=2))


def _patch_chroma_single(block) -> torch.nn.Module:
    region = _ChromaSingleRegion(block)

    def forward(hidden_states, temb, image_rotary_emb=None, attention_mask=None, joint_attention_kwargs=None):
        norm_x, gate = block.norm(hidden_states, emb=temb)
        return hidden_states + gate.unsqueeze(1) * region(norm_x, attention_mask, image_rotary_emb)

    block.forward = forward
    return region


def chroma_regions(model) -> list:
    regions = _double_stream(model.transformer_blocks)
    for i, block in enumerate(model.single_transformer_blocks):
        regions.append((f"s{i}.mlp_attn", _patch_chroma_single(block), [0]))
    return regions


def mochi_regions(model) -> list:
    regions = []
    for i, block in enumerate(model.transformer_blocks):
        regions += [(f"{i}.attn1", block.attn1, _JOINT), (f"{i}.ff", block.ff, [0])]
        if block.ff_context is not None:
            regions.append((f"{i}.ff_context", block.ff_context, [0]))
    return regions


def qwenimage_regions(model) -> list:
    """Qwen-Image: joint attention (image and text inputs and outputs), then each stream's MLP."""
    regions = []
    for i, block in enumerate(model.transformer_blocks):
        regions += [(f"{i}.attn", block.attn, _JOINT), (f"{i}.img_mlp", block.img_mlp, [0]),
                    (f"{i}.txt_mlp", block.txt_mlp, [0])]
    return regions


def flux2_regions(model) -> list:
    """FLUX.2: FLUX's double blocks; a single block's parallel MLP + attention + proj_out is one module."""
    regions = _double_stream(model.transformer_blocks)
    for i, block in enumerate(model.single_transformer_blocks):
        regions.append((f"s{i}.attn", block.attn, ["hidden_states"]))
    return regions


def sana_regions(model) -> list:
    """Sana: attn1, attn2 (its input is the block's un-normalized hidden state), ff (on the NCHW view)."""
    regions = []
    for i, block in enumerate(model.transformer_blocks):
        regions += [(f"{i}.attn1", block.attn1, [0]), (f"{i}.attn2", block.attn2, [0]), (f"{i}.ff", block.ff, [0])]
    return regions


def zimage_regions(model) -> list:
    """Z-Image: attention and feed_forward of the noise refiner's and the main layers' blocks; the
    context refiner's (caption only, the same at every step) are not cached."""
    regions = []
    for part in ("noise_refiner", "layers"):
        for i, block in enumerate(getattr(model, part)):
            regions += [(f"{part}{i}.attention", block.attention, [0]),
                        (f"{part}{i}.feed_forward", block.feed_forward, [0])]
    return regions


def wan_vace_regions(model) -> list:
    """Wan VACE: the control blocks run first (their hints are added to the Wan blocks), Wan's regions each."""
    return _wan_blocks(model.vace_blocks, "vace") + _wan_blocks(model.blocks)


def auraflow_regions(model) -> list:
    """AuraFlow: joint blocks' attn (both streams), ff, ff_context; single blocks' attn and ff."""
    regions = _double_stream(model.joint_transformer_blocks, "j")
    for i, block in enumerate(model.single_transformer_blocks):
        regions += [(f"s{i}.attn", block.attn, ["hidden_states"]), (f"s{i}.ff", block.ff, [0])]
    return regions


def krea2_regions(model) -> list:
    """Krea 2: each block's attn and ff (X = their first argument); the text fusion blocks, on the
    prompt alone, are not cached."""
    return [region for i, block in enumerate(model.transformer_blocks)
            for region in ((f"{i}.attn", block.attn, [0]), (f"{i}.ff", block.ff, [0]))]


#: family name (tests/conftest.py FAMILIES) -> region list builder
class _PairedCalls(torch.nn.Module):
    """One module called on two inputs in a row as one region: CogView4's ff, on the image stream,
    then on the text stream."""

    def __init__(self, module):
        super().__init__()
        object.__setattr__(self, "module", module)  # not a submodule: no parameter aliasing

    def forward(self, first, second):
        return self.module(first), self.module(second)


def _patch_cogview4_block(block) -> torch.nn.Module:
    ff = _PairedCalls(block.ff)

    def forward(hidden_states, encoder_hidden_states, temb=None, image_rotary_emb=None, attention_mask=None,
                attention_kwargs=None):
        (norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = block.norm1(hidden_states, encoder_hidden_states, temb)
        attn_x, attn_c = block.attn1(hidden_states=norm_x, encoder_hidden_states=norm_c,
                                     image_rotary_emb=image_rotary_emb, attention_mask=attention_mask,
                                     **(attention_kwargs or {}))
        hidden_states = hidden_states + attn_x * gate_msa.unsqueeze(1)
        encoder_hidden_states = encoder_hidden_states + attn_c * c_gate_msa.unsqueeze(1)
        norm_x = block.norm2(hidden_states) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
        norm_c = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp.unsqueeze(1)) + c_shift_mlp.unsqueeze(1)
        ff_x, ff_c = ff(norm_x, norm_c)
        return hidden_states + ff_x * gate_mlp.unsqueeze(1), encoder_hidden_states + ff_c * c_gate_mlp.unsqueeze(1)

    block.forward = forward
    return ff


def cogview4_regions(model) -> list:
    """CogView4: joint attn1 (X = both streams), then one ff module called on each stream: one
    region whose X is both calls' inputs (the block's forward re-implemented around it)."""
    return [region for i, block in enumerate(model.transformer_blocks)
            for region in ((f"{i}.attn1", block.attn1, _JOINT), (f"{i}.ff", _patch_cogview4_block(block), [0, 1]))]


def kandinsky5_regions(model) -> list:
    """Kandinsky 5: the text blocks' self_attention and feed_forward (X = arg 0; their input moves
    with the timestep's modulation), then the visual blocks' self_attention, cross_attention (X = the
    visual input and the encoded text) and feed_forward."""
    text = [region for i, block in enumerate(model.text_transformer_blocks)
            for region in ((f"t{i}.self_attention", block.self_attention, [0]),
                           (f"t{i}.feed_forward", block.feed_forward, [0]))]
    return text + [region for i, block in enumerate(model.visual_transformer_blocks)
                   for region in ((f"v{i}.self_attention", block.self_attention, [0]),
                                  (f"v{i}.cross_attention", block.cross_attention, [0, "encoder_hidden_states"]),
                                  (f"v{i}.feed_forward", block.feed_forward, [0]))]


def ltx2_regions(model) -> list:
    """LTX-2: per block, video and audio self-attention (X = ``hidden_states``, passed by keyword), each
    stream's text cross-attention (X = arg 0), audio-to-video and video-to-audio attention (X = the
    modulated query stream and the other stream, ``encoder_hidden_states``), each stream's FF."""
    features = {"attn1": ["hidden_states"], "audio_attn1": ["hidden_states"], "attn2": [0], "audio_attn2": [0],
                "audio_to_video_attn": [0, "encoder_hidden_states"], "video_to_audio_attn": [0, "encoder_hidden_states"],
                "ff": [0], "audio_ff": [0]}
    return [(f"{i}.{name}", getattr(block, name), x) for i, block in enumerate(model.transformer_blocks)
            for name, x in features.items()]


def hidream_regions(model) -> list:
    """HiDream-I1 (each block in a HiDreamBlock wrapper): the double blocks' joint attn1 (X = the image
    and text streams, args 0 and 2), image MoE ff_i and text ff_t; the single blocks' attn1 and ff_i."""
    regions = []
    for i, wrapper in enumerate(model.double_stream_blocks):
        block = wrapper.block
        regions += [(f"d{i}.attn", block.attn1, [0, 2]), (f"d{i}.ff_i", block.ff_i, [0]), (f"d{i}.ff_t", block.ff_t, [0])]
    for i, wrapper in enumerate(model.single_stream_blocks):
        regions += [(f"s{i}.attn", wrapper.block.attn1, [0]), (f"s{i}.ff_i", wrapper.block.ff_i, [0])]
    return regions


class _SampleRows(torch.nn.Module):
    """A region of a block that runs on rows folding another axis into the batch (Latte: a sample's
    frames, or its patch positions), seen by the reference as (batch, rows per sample, ...): its
    per-sample norms are the sample's, not a frame's. The block still calls the region module on its
    rows: that call goes through this module, which the reference patches."""

    def __init__(self, module, batch: list[int]):
        super().__init__()
        object.__setattr__(self, "module", module)  # not a submodule: no parameter aliasing
        self.call = module.forward  # the region's own forward
        self.batch = batch  # [the model call's batch], set by a pre-hook on the model
        module.forward = lambda x, *args, **kwargs: self(x.unflatten(0, (self.batch[0], -1)), *args, **kwargs).flatten(0, 1)

    def forward(self, x, *args, **kwargs):
        return self.call(x.flatten(0, 1), *args, **kwargs).unflatten(0, (self.batch[0], -1))


def latte_regions(model) -> list:
    """Latte: each layer's spatial block (attn1, attn2, ff; rows: a sample's frames), then its temporal
    block (attn1, ff; rows: a sample's patch positions), in the order the model calls them; X = arg 0,
    grouped by sample (the model's batch: ``hidden_states``' first dim)."""
    batch = [0]
    model.register_forward_pre_hook(lambda m, args, kwargs: batch.__setitem__(0, kwargs["hidden_states"].shape[0]),
                                    with_kwargs=True)
    regions = []
    for i, (spatial, temporal) in enumerate(zip(model.transformer_blocks, model.temporal_transformer_blocks)):
        for prefix, block in ((f"s{i}", spatial), (f"t{i}", temporal)):
            regions += [(f"{prefix}.{name}", _SampleRows(getattr(block, name), batch), [0])
                        for name in ("attn1", "attn2", "ff") if getattr(block, name) is not None]
    return regions


FAMILY_REGIONS = {
    "flux": flux_regions, "sd3": sd3_regions, "pixart": dit_regions, "wan": wan_regions,
    "hunyuan_video": hunyuan_video_regions, "cogvideox": cogvideox_regions, "ltx_video": ltx_video_regions,
    "chroma": chroma_regions, "skyreels_v2": wan_regions, "mochi": mochi_regions, "qwenimage": qwenimage_regions,
    "flux2": flux2_regions, "sana": sana_regions, "zimage": zimage_regions, "wan_vace": wan_vace_regions,
    "auraflow": auraflow_regions, "hunyuan_image": hunyuan_video_regions,
    "hunyuan_video_framepack": hunyuan_video_regions,  # HunyuanVideo's blocks over history + latent tokens
    "longcat_image": flux_regions, "ovis_image": lambda model: flux_regions(model, swiglu=True), "bria": flux_regions,
    "flux3": flux3_regions, "krea2": krea2_regions, "cogview4": cogview4_regions, "cosmos": dit_regions,
    "hunyuandit": lambda model: dit_regions(model, model.blocks), "sana_video": sana_regions,
    "chronoedit": wan_regions, "helios": wan_regions, "kandinsky5": kandinsky5_regions,
    "motif_video": motif_video_regions, "ltx2": ltx2_regions, "hidream": hidream_regions,
    # CogView3-Plus: CogVideoX's layout (joint attn1; one ff call on the concatenated text + image states)
    "cogview3plus": cogvideox_regions,
    "latte": latte_regions,
    "bria_fibo": lambda model: _double_stream(model.transformer_blocks) + [
        (f"s{i}.mlp_attn", _patch_fibo_single(block), [0]) for i, block in enumerate(model.single_transformer_blocks)],
}
