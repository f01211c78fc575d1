"""Forward KL(base ‖ model) on benign rows, cross-entropy on harmful rows (the paper's KL variant).

The divergence is computed from hidden states through the output projection in token/vocabulary
tiles by TRL's `ChunkedDivergenceFunction` (Triton on GPU, torch tiles elsewhere), so neither
model's full-vocabulary logits are ever materialised: the paper's code held both models' fp32
logits for the whole sequence. Positions are those whose label is not -100 — the same positions
CE uses — so prompt masking applies to the KL rows too (the paper's collator silently dropped it).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from trl import SFTTrainer

from thinksafe.registry import KL_WEIGHTINGS, ROW_WEIGHTING
from thinksafe.train.data import KL_COLUMN, REFERENCE_COLUMNS

IGNORE_INDEX = -100
FORWARD_KL_BETA = 0.0  # ChunkedDivergenceFunction: beta 0 = KL(teacher ‖ student)


def _head_params(head) -> tuple[torch.Tensor, torch.Tensor | None]:
    return head.weight, getattr(head, "bias", None)


def forward_kl_per_token(student_hidden: torch.Tensor, student_head, teacher_hidden: torch.Tensor,
                         teacher_head, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) per token, summed over the vocabulary, without [N, V] logits.

    student_hidden: [N, H] final hidden states (after the last norm) at the N loss positions.
    teacher_hidden: [N, H] the base model's hidden states at the same positions (no gradient).
    student_head / teacher_head: the output projections (weight [V, H], optional bias [V]).
    Returns [N] float32; the gradient flows to `student_hidden` (and the student head if trainable).
    Equals `kl_div(log_softmax(h_s W_sᵀ), log_softmax(h_t W_tᵀ), log_target=True).sum(-1)`.
    """
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    s_weight, s_bias = _head_params(student_head)
    t_weight, t_bias = _head_params(teacher_head)
    divergence, _entropy = ChunkedDivergenceFunction.apply(
        student_hidden, s_weight, s_bias, teacher_hidden.detach(), t_weight.detach(),
        None if t_bias is None else t_bias.detach(), FORWARD_KL_BETA, 1.0,
        logit_scale, softcap, logit_scale, softcap,
    )
    return divergence


# Logit entries per tile of the cached KL: a [tile, V] fp32 block (256 MB; 441 tokens at Qwen's 152k
# vocabulary, all of the demo's 49k-vocabulary micro-batch tokens up to 1,365) is the largest thing it
# builds, forward or backward.
CACHED_KL_TILE_ELEMENTS = 64 * 2**20


def topk_tail_kl(logits: torch.Tensor, ref_ids: torch.Tensor, ref_logprobs: torch.Tensor,
                 ref_tail: torch.Tensor) -> torch.Tensor:
    """[n] KL(p_base ‖ p_model) over the base's top-k tokens plus one bucket for the rest of the vocabulary.

    logits: [n, V] the model's logits; ref_ids / ref_logprobs: [n, k] the base's top-k token ids and
    their log-probabilities (temperature 1); ref_tail: [n] the base's mass outside them. This is the
    exact KL between the two distributions coarsened to k+1 outcomes, so it never exceeds the full
    one (data processing inequality); what it misses is tail · KL(base tail shape ‖ model tail shape).
    Its gradient in the logits is q - p on the top-k and q - tail·q/Q_tail elsewhere.
    This autograd form is the definition; `cached_kl_per_token` computes the same in tiles by hand.
    """
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    model_top = logits.gather(1, ref_ids) - log_z[:, None]
    model_tail = _masked_logsumexp_(logits.clone(), ref_ids) - log_z
    return _kl_from_log_probs(model_top, model_tail, ref_logprobs, ref_tail)


def _masked_logsumexp_(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logsumexp over the entries not in `ids`, overwriting `logits` there.

    The model's tail from its own tail logits, not 1 - Σ top-k: no cancellation when the top-k hold
    nearly all of the mass. The top-k are masked with the lowest finite value, not -inf: with an
    empty tail (k = V) that keeps 0 · log Q_tail at 0, and its gradient finite.
    """
    return torch.logsumexp(logits.scatter_(1, ids, torch.finfo(logits.dtype).min), dim=-1)


def _kl_from_log_probs(model_top, model_tail, ref_logprobs, ref_tail) -> torch.Tensor:
    base_top, tail = ref_logprobs.float(), ref_tail.float()
    top = (base_top.exp() * (base_top - model_top)).sum(-1)
    return top + torch.xlogy(tail, tail) - tail * model_tail


def _tile_logits(hidden, weight, bias, logit_scale) -> torch.Tensor:
    """[n, V] fp32 logits of one tile: the projection in the weights' precision, as the model's own head."""
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    return logits.mul_(logit_scale) if logit_scale != 1.0 else logits


class _CachedTopKKL(torch.autograd.Function):
    """KL(base ‖ model) per token from hidden states, in token tiles, with a hand-written backward.

    Written by hand because no library computes a KL against a stored top-k (TRL's and Liger's
    fused heads take the teacher's hidden states or logits). Autograd through `topk_tail_kl` keeps
    several [tile, V] fp32 intermediates per tile and replays them all in the backward; here the
    forward keeps two numbers per token (log Z and the log tail mass) and the backward rebuilds
    each tile's logits once and turns them into the logits' gradient in place:
        dKL/dz_j = q_j - p_j (top-k),   q_j - tail · q_j / Q_tail (elsewhere)
    (q_j times the stored mass Σ p_top + tail, which float16 storage leaves a little off 1).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_ids, ref_logprobs, ref_tail, logit_scale, tile):
        n_tokens = hidden.size(0)
        log_z = hidden.new_empty(n_tokens, dtype=torch.float32)
        log_tail = torch.empty_like(log_z)
        kl = torch.empty_like(log_z)
        for start in range(0, n_tokens, tile):
            part = slice(start, start + tile)
            logits = _tile_logits(hidden[part], weight, bias, logit_scale)
            log_z[part] = torch.logsumexp(logits, dim=-1)
            model_top = logits.gather(1, ref_ids[part]) - log_z[part, None]
            log_tail[part] = _masked_logsumexp_(logits, ref_ids[part])
            kl[part] = _kl_from_log_probs(model_top, log_tail[part] - log_z[part], ref_logprobs[part], ref_tail[part])
        ctx.save_for_backward(hidden, weight, bias, ref_ids, ref_logprobs, ref_tail, log_z, log_tail)
        ctx.logit_scale, ctx.tile = logit_scale, tile
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, bias, ref_ids, ref_logprobs, ref_tail, log_z, log_tail = ctx.saved_tensors
        grads = _recomputed_grads(hidden, weight, bias, ref_ids, ref_logprobs, ref_tail, log_z, log_tail, grad_kl,
                                  ctx.logit_scale, ctx.tile, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None)


def _recomputed_grads(hidden, weight, bias, ref_ids, ref_logprobs, ref_tail, log_z, log_tail, grad_kl, logit_scale,
                      tile, wants) -> tuple:
    """(d hidden, d weight, d bias) of Σ grad_kl · KL, each tile's logits rebuilt from the hidden states.

    Off the top-k, dKL/dz_j = mass·q_j - tail·q_j/Q_tail, where mass = Σ p_top + tail is 1 up to the
    float16 rounding of the stored log-probs (kept: this is the gradient of the value returned).
    = exp(z_j + a) - exp(z_j + b), a = log mass - log Z, b = log tail - log(Q_tail·Z); factored as
    exp(z_j + m)·(e^(a-m) - e^(b-m)) with m = max(a, b), so no term overflows off the top-k.
    """
    wants_hidden, wants_weight, wants_bias = wants
    grad_hidden = torch.empty_like(hidden) if wants_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_bias else None
    tail = ref_tail.float()
    p_top = ref_logprobs.float().exp()
    a = (p_top.sum(-1) + tail).log() - log_z
    b = torch.where(tail > 0, tail.clamp_min(torch.finfo(torch.float32).tiny).log() - log_tail, float("-inf"))
    m = torch.maximum(a, b)
    scale = grad_kl.float() * ((a - m).exp() - (b - m).exp())
    for start in range(0, hidden.size(0), tile):
        part = slice(start, start + tile)
        ids, g = ref_ids[part], grad_kl[part].float()[:, None]
        grad = _tile_logits(hidden[part], weight, bias, logit_scale)
        top = (grad.gather(1, ids) + a[part, None]).exp() - p_top[part]
        grad.add_(m[part, None]).exp_().mul_(scale[part, None]).scatter_(1, ids, top * g)
        if logit_scale != 1.0:
            grad.mul_(logit_scale)
        grad = grad.to(weight.dtype)
        if wants_hidden:
            grad_hidden[part] = (grad @ weight).to(hidden.dtype)
        if wants_weight:
            with torch.autocast(hidden.device.type, enabled=False):  # float32 accumulation, as in the fused path
                grad_weight.addmm_(grad.t().float(), hidden[part].float())
        if wants_bias:
            grad_bias += grad.float().sum(0)
    return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


# --- the fused head: each chunk's logits formed once, the KL and its gradients in the forward ------------
#
# What `_CachedTopKKL` does in two passes (forward: logits -> KL; backward: logits again -> gradient),
# this does in one, as Liger's fused linear cross-entropy does for CE: per chunk of tokens the logits
# are formed once, in the head's dtype, and overwritten in place by their own gradient; the chunk's
# hidden-state gradient (and, for a trainable head, its share of the weight's) is taken right there, so
# the backward only scales what the forward stored. One projection fewer per step, and the softmax
# pieces run as one Triton kernel on a GPU (two passes over the chunk's logits: an online logsumexp
# of the tail, then the gradient written over them) instead of ~8 separate fp32 passes.
# No library has this kernel: Liger's and TRL's fused heads take the teacher's hidden states or a
# label, not a stored top-k with a tail bucket.


def _tail_logsumexp_and_grad_torch(logits, top_lse, log_mass, tail, logit_scale):
    """(log_tail, log_z) per row of `logits` [n, V] whose top-k entries hold -inf; `logits` is then
    overwritten with dKL/dz (times `logit_scale`, for the chain rule) off the top-k, 0 on it.

    log_tail = logsumexp of the tail logits (log(Q_tail·Z)); log_z = logaddexp(log_tail, top_lse).
    Off the top-k, dKL/dz_j = exp(z_j + a) - exp(z_j + b), a = log mass - log Z, b = log tail - log_tail,
    written as exp(z_j + m)·(e^(a-m) - e^(b-m)), m = max(a, b), so nothing overflows (_recomputed_grads).
    A tail with no tokens (k = V) or no base mass has no bucket: b = -inf.
    """
    x = logits.float()  # a copy for 16-bit logits, the tile itself for float32 ones
    if logit_scale != 1.0:
        x.mul_(logit_scale)
    log_tail = torch.logsumexp(x, dim=-1)
    log_z = torch.logaddexp(log_tail, top_lse)
    a, m, coef = _grad_coefficients(log_z, log_tail, log_mass, tail, logit_scale)
    x.add_(m[:, None]).exp_().mul_(coef[:, None])
    if x is not logits:
        logits.copy_(x)
    return log_tail, log_z


def _grad_coefficients(log_z, log_tail, log_mass, tail, logit_scale):
    """(a, m, (e^(a-m) - e^(b-m))·logit_scale) per row: _tail_logsumexp_and_grad_torch's docstring."""
    a = log_mass - log_z
    has_bucket = (tail > 0) & (log_tail > float("-inf"))
    b = torch.where(has_bucket, tail.clamp_min(torch.finfo(torch.float32).tiny).log() - log_tail, float("-inf"))
    m = torch.maximum(a, b)
    return a, m, ((a - m).exp() - (b - m).exp()) * logit_scale


_TRITON_KERNEL = None


def _triton_kernel():
    """The Triton form of `_tail_logsumexp_and_grad_torch` (built once, on first use)."""
    global _TRITON_KERNEL
    if _TRITON_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def tail_logsumexp_and_grad(z_ptr, z_stride, n_cols, logit_scale, top_lse_ptr, log_mass_ptr, tail_ptr,
                                    log_tail_ptr, log_z_ptr, BLOCK: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            z_row = z_ptr + row * z_stride
            offsets = tl.arange(0, BLOCK)
            # pass 1: online logsumexp of the row (its top-k entries hold -inf: the tail alone)
            m = float("-inf")
            s = 0.0
            for start in range(0, n_cols, BLOCK):
                cols = start + offsets
                x = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * logit_scale
                m_new = tl.maximum(m, tl.max(x, 0))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf block so far: nothing to rescale
                s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
                m = m_new
            log_tail = tl.where(s > 0, m + tl.log(s), float("-inf"))
            top_lse = tl.load(top_lse_ptr + row)
            hi = tl.maximum(log_tail, top_lse)  # top_lse is finite (k >= 1)
            log_z = hi + tl.log(tl.exp(log_tail - hi) + tl.exp(top_lse - hi))
            tail = tl.load(tail_ptr + row)
            a = tl.load(log_mass_ptr + row) - log_z
            has_bucket = (tail > 0) & (log_tail > float("-inf"))
            b = tl.where(has_bucket, tl.log(tl.maximum(tail, 1.1754943508222875e-38)) - log_tail, float("-inf"))
            mm = tl.maximum(a, b)
            coef = (tl.exp(a - mm) - tl.exp(b - mm)) * logit_scale
            # pass 2: the gradient written over the logits (0 where they hold -inf: the top-k, set after)
            for start in range(0, n_cols, BLOCK):
                cols = start + offsets
                x = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * logit_scale
                tl.store(z_row + cols, (tl.exp(x + mm) * coef).to(z_ptr.dtype.element_ty), mask=cols < n_cols)
            tl.store(log_tail_ptr + row, log_tail)
            tl.store(log_z_ptr + row, log_z)

        _TRITON_KERNEL = tail_logsumexp_and_grad
    return _TRITON_KERNEL


TRITON_BLOCK, TRITON_WARPS = 8192, 16  # a program per token; the row (152k logits for Qwen) in blocks of 8,192


def _tail_logsumexp_and_grad_triton(logits, top_lse, log_mass, tail, logit_scale):
    n, vocab = logits.shape
    log_tail = torch.empty(n, device=logits.device, dtype=torch.float32)
    log_z = torch.empty_like(log_tail)
    _triton_kernel()[(n,)](logits, logits.stride(0), vocab, float(logit_scale), top_lse.contiguous(),
                           log_mass.contiguous(), tail.contiguous(), log_tail, log_z,
                           BLOCK=TRITON_BLOCK, num_warps=TRITON_WARPS)
    return log_tail, log_z


def _use_triton(device: torch.device) -> bool:
    """The Triton kernel on CUDA when triton imports (THINKSAFE_CACHED_KL_TRITON=0 turns it off; =1 forces it,
    e.g. under TRITON_INTERPRET=1 on a CPU, as the tests do)."""
    import os

    forced = os.environ.get("THINKSAFE_CACHED_KL_TRITON")
    if forced is not None:
        return forced == "1"
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _fused_chunk(hidden, weight, bias, ids, ref_logprobs, tail, logit_scale, use_triton):
    """(kl [n], gradient of the KL in the chunk's logits [n, V] in the head's dtype) from one projection.

    The ids of a row are distinct, as a top-k's are (the store's): log Z is the tail's logsumexp and the
    top-k's, so a repeated id would count twice.
    """
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)
    top = logits.gather(1, ids).float()
    if logit_scale != 1.0:
        top = top * logit_scale
    logits.scatter_(1, ids, float("-inf"))  # the tail alone; the top-k values are kept in `top`
    p_top, tail = ref_logprobs.float().exp(), tail.float()
    log_mass = (p_top.sum(-1) + tail).log()
    fn = _tail_logsumexp_and_grad_triton if use_triton else _tail_logsumexp_and_grad_torch
    log_tail, log_z = fn(logits, torch.logsumexp(top, dim=-1), log_mass, tail, logit_scale)
    model_top = top - log_z[:, None]
    has_bucket = (tail > 0) & (log_tail > float("-inf"))
    model_tail = torch.where(has_bucket, log_tail - log_z, 0.0)  # no bucket: its term is 0 (see above)
    kl = (p_top * (ref_logprobs.float() - model_top)).sum(-1) + torch.xlogy(tail, tail) - tail * model_tail
    # on the top-k: dKL/dz_j = mass·q_j - p_j
    top_grad = ((model_top + log_mass[:, None]).exp() - p_top) * logit_scale
    logits.scatter_(1, ids, top_grad.to(logits.dtype))
    return kl, logits


class _FusedCachedKL(torch.autograd.Function):
    """The cached KL per token with its gradients taken in the forward (the section's comment above).

    Each token's KL depends on its own hidden state only, so d KL_i / d h_i is stored per token and the
    backward scales it by any upstream gradient. The head's gradient is a sum over tokens, so it is
    accumulated with `token_weights` (the weight each token's KL carries in the loss; default 1): the
    backward scales it when the upstream gradient is proportional to them, as in the trainer's loss
    (one constant, the rows or tokens of the step), and otherwise recomputes it exactly, tile by tile.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_ids, ref_logprobs, ref_tail, token_weights, logit_scale, chunk,
                with_grads):
        n_tokens = hidden.size(0)
        wants_hidden, wants_weight = with_grads and hidden.requires_grad, with_grads and weight.requires_grad
        wants_bias = with_grads and bias is not None and bias.requires_grad
        use_triton = _use_triton(hidden.device)
        kl = hidden.new_empty(n_tokens, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_bias else None
        for start in range(0, n_tokens, chunk):
            part = slice(start, start + chunk)
            h = hidden[part]
            kl[part], grad = _fused_chunk(h, weight, bias, ref_ids[part], ref_logprobs[part], ref_tail[part],
                                          logit_scale, use_triton)
            if wants_hidden:
                grad_hidden[part] = (grad @ weight).to(hidden.dtype)
            if wants_weight or wants_bias:
                w = token_weights[part].float()[:, None]
                # accumulated in float32 (the trainer's bf16 autocast would cast the product to bf16)
                with torch.autocast(hidden.device.type, enabled=False):
                    if wants_weight:
                        grad_weight.addmm_(grad.t().float(), h.float() * w)
                    if wants_bias:
                        grad_bias += (grad.float() * w).sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, token_weights, hidden, weight, bias, ref_ids,
                              ref_logprobs, ref_tail)
        ctx.logit_scale, ctx.chunk, ctx.wants = logit_scale, chunk, (wants_hidden, wants_weight, wants_bias)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        grad_hidden, grad_weight, grad_bias, token_weights, hidden, weight, bias, ids, logprobs, tail = \
            ctx.saved_tensors
        g = grad_kl.float()
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * g[:, None]).to(hidden.dtype)
        if grad_weight is not None or grad_bias is not None:
            factor = _common_factor(g, token_weights.float())
            if factor is None:  # not the loss the forward prepared for: the exact gradient, recomputed
                log_z, log_tail = _log_z_and_tail(hidden, weight, bias, ids, logprobs, tail, ctx.logit_scale,
                                                  ctx.chunk)
                _, grad_weight, grad_bias = _recomputed_grads(
                    hidden, weight, bias, ids, logprobs, tail, log_z, log_tail, grad_kl, ctx.logit_scale, ctx.chunk,
                    (False, grad_weight is not None, grad_bias is not None))
            else:
                grad_weight = None if grad_weight is None else (grad_weight * factor).to(weight.dtype)
                grad_bias = None if grad_bias is None else (grad_bias * factor).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _common_factor(upstream: torch.Tensor, token_weights: torch.Tensor, rtol: float = 1e-5):
    """c with upstream = c · token_weights (to rtol of the largest), else None."""
    factor = (upstream * token_weights).sum() / (token_weights * token_weights).sum().clamp_min(1e-30)
    residual = (upstream - factor * token_weights).abs().max()
    if float(residual) > rtol * float(upstream.abs().max()) + 1e-30:
        return None
    return factor


def _log_z_and_tail(hidden, weight, bias, ids, logprobs, tail, logit_scale, chunk):
    """log Z and the log tail mass per token (what `_CachedTopKKL` keeps), for the exact fallback."""
    log_z = hidden.new_empty(hidden.size(0), dtype=torch.float32)
    log_tail = torch.empty_like(log_z)
    with torch.no_grad():
        for start in range(0, hidden.size(0), chunk):
            part = slice(start, start + chunk)
            logits = _tile_logits(hidden[part], weight, bias, logit_scale)
            log_z[part] = torch.logsumexp(logits, dim=-1)
            log_tail[part] = _masked_logsumexp_(logits, ids[part])
    return log_z, log_tail


def _tile_kl_softcapped(hidden, weight, bias, ref_ids, ref_logprobs, ref_tail, logit_scale, softcap):
    logits = _tile_logits(hidden, weight, bias, logit_scale)
    return topk_tail_kl(torch.tanh(logits / softcap) * softcap, ref_ids, ref_logprobs, ref_tail)


CACHED_KL_FUSED, CACHED_KL_TILES = "fused", "tiles"  # the two hand-written paths of cached_kl_per_token


def cached_kl_per_token(student_hidden: torch.Tensor, student_head, ref_ids: torch.Tensor,
                        ref_logprobs: torch.Tensor, ref_tail: torch.Tensor, logit_scale: float = 1.0,
                        softcap: float | None = None, tile: int | None = None,
                        token_weights: torch.Tensor | None = None, path: str = CACHED_KL_FUSED) -> torch.Tensor:
    """KL(base ‖ model) per token against the base's top-k stored at synthesis: no reference forward.

    student_hidden: [N, H] at the N loss positions; ref_*: [N, k], [N, k], [N] (thinksafe.reference_topk).
    Tiles of `tile` tokens (default: CACHED_KL_TILE_ELEMENTS logits), so only one tile's logits exist
    at a time. Returns [N] float32 (topk_tail_kl); the gradient flows to `student_hidden` and a
    trainable head. `path`: "fused" (default; `_FusedCachedKL`: each tile's logits formed once, the
    gradients taken in the forward, the softmax pieces in one Triton kernel on a GPU) or "tiles"
    (`_CachedTopKKL`: the logits formed again in the backward; kept as the reference the fused path is
    tested against). `token_weights` [N]: each token's weight in the loss, which lets the fused path
    take a trainable head's gradient in the forward (a frozen head, LoRA's, needs none). A soft-capped
    head (no registered family has one) goes through autograd on checkpointed tiles: slower, same values.
    """
    if path not in (CACHED_KL_FUSED, CACHED_KL_TILES):
        raise ValueError(f"unknown cached KL path {path!r}")
    weight, bias = _head_params(student_head)
    device = student_hidden.device
    ref_ids, ref_logprobs, ref_tail = ref_ids.to(device, torch.long), ref_logprobs.to(device), ref_tail.to(device)
    tile = tile or max(1, CACHED_KL_TILE_ELEMENTS // weight.size(0))
    if student_hidden.size(0) == 0:
        return student_hidden.new_zeros(0, dtype=torch.float32)
    if softcap:
        from torch.utils.checkpoint import checkpoint

        return torch.cat([checkpoint(_tile_kl_softcapped, student_hidden[part], weight, bias, ref_ids[part],
                                     ref_logprobs[part], ref_tail[part], logit_scale, softcap, use_reentrant=False)
                          for part in (slice(s, s + tile) for s in range(0, student_hidden.size(0), tile))])
    if path == CACHED_KL_TILES:
        return _CachedTopKKL.apply(student_hidden, weight, bias, ref_ids, ref_logprobs, ref_tail, float(logit_scale),
                                   tile)
    if token_weights is None:
        token_weights = torch.ones(student_hidden.size(0), device=device)
    # Gradients are taken in the forward only when a backward can follow (not under no_grad / inference).
    with_grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, weight, bias))
    return _FusedCachedKL.apply(student_hidden, weight, bias, ref_ids, ref_logprobs, ref_tail,
                                token_weights.to(device), float(logit_scale), tile, with_grads)


def row_means_sum(token_losses: torch.Tensor, row_index: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
    """(sum over rows of each row's mean token loss, rows with at least one token).

    token_losses: [N] per-token losses; row_index: [N] the row (0..n_rows-1) each token belongs to.
    """
    sums = token_losses.new_zeros(n_rows).index_add(0, row_index, token_losses)
    counts = torch.bincount(row_index, minlength=n_rows)
    present = counts > 0
    return (sums[present] / counts[present]).sum(), int(present.sum())


def row_weighted_loss(row_means: torch.Tensor, rows_in_step: int, process_scale: int = 1) -> torch.Tensor:
    """The paper's objective for one micro-batch: its rows' summed means / the rows of the whole step.

    The paper's loss is (ce_mean·n_ce + kl_mean·n_kl)/(n_ce + n_kl) on micro-batches of one row, i.e.
    the mean over rows of each row's per-token mean. Dividing by the rows of the accumulated,
    all-process step (not of the micro-batch) keeps that mean under gradient accumulation, which
    the paper's trainer did not (its bug 5); `process_scale` (the process count) undoes DDP's
    averaging of the gradients over processes.
    """
    return row_means / max(rows_in_step, 1) * process_scale


def token_weighted_loss(ce_sum: torch.Tensor, kl_sum: torch.Tensor, tokens_in_step, process_scale: int = 1):
    """(CE sum + KL sum) / the loss tokens of the step: a KL token weighs what a CE token weighs."""
    denominator = torch.as_tensor(tokens_in_step, device=kl_sum.device).clamp(min=1)
    return (ce_sum + kl_sum) / denominator * process_scale


@contextmanager
def capture_output(module: torch.nn.Module):
    """Keep the module's last forward output (`captured["output"]`) while the context is open."""
    captured = {}

    def hook(_module, _args, output):
        captured["output"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def last_hidden_state(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def causal_lm(model):
    """The transformers CausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if _is_peft(model) else model


class KLSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is KL(base ‖ model) on rows flagged `kl` and TRL's own CE on the rest.

    The base is the same network with the LoRA adapter disabled (no second copy of the weights);
    for full fine-tuning pass `ref_model`, a frozen copy. `weighting` (KL_WEIGHTINGS) says how
    rows and tokens weigh: "row" (the paper's objective) or "token". CE per token comes from TRL's
    fused LM head (its `log_probs`), so no full-vocabulary logits are built for either term. CE and
    KL are logged separately (`ce_loss`, `kl_loss`, per-token means of the micro-batch, KL before
    `kl_coef`, the weight of the KL term in the loss: 1 in the paper).
    """

    def __init__(self, *args, ref_model=None, weighting: str = ROW_WEIGHTING, kl_coef: float = 1.0, **kwargs):
        if weighting not in KL_WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of: {', '.join(KL_WEIGHTINGS)}")
        super().__init__(*args, **kwargs)
        self.weighting = weighting
        self.kl_coef = kl_coef  # the KL term's weight; 1 is the paper's loss
        self.rows_in_step: int | None = None  # rows with a loss token in this optimizer step, all processes
        if weighting == ROW_WEIGHTING:
            if self.compute_loss_func is not None or self.label_smoother is not None:
                raise ValueError("row weighting reads TRL's fused per-token log-probs: no compute_loss_func "
                                 "or label smoothing")
            self.loss_is_scaled_for_ga = True  # divided by the rows of the whole step, never again by the steps
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
            self.ref_model = ref_model.to(self.accelerator.device)

    # --- the rows of an optimizer step ----------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also count the rows of the accumulated batch over all processes (the row weighting's divisor)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        local = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=1).sum()) for batch in batch_samples)
        total = torch.tensor(local, device=device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.gather(total[None]).sum()
        self.rows_in_step = int(total)
        return batch_samples, num_items_in_batch

    # --- the two forwards ---------------------------------------------------------------------

    def _backbone(self, model):
        return causal_lm(self.accelerator.unwrap_model(model)).base_model

    def _reference(self, model):
        """(backbone, head, context) of the base model: the frozen copy or the adapter disabled."""
        if self.ref_model is not None:
            ref = causal_lm(self.ref_model)
            return ref.base_model, ref.get_output_embeddings(), nullcontext()
        unwrapped = self.accelerator.unwrap_model(model)
        if not _is_peft(unwrapped):
            raise ValueError("KL without a LoRA adapter needs ref_model (a frozen copy of the base model)")
        lm = causal_lm(unwrapped)
        return lm.base_model, lm.get_output_embeddings(), unwrapped.disable_adapter()

    @torch.no_grad()
    def _reference_hidden(self, model, inputs: dict, rows: torch.Tensor) -> tuple[torch.Tensor, object]:
        backbone, head, context = self._reference(model)
        sub = {k: inputs[k][rows] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        with context:
            hidden = backbone(**sub, use_cache=False).last_hidden_state
        return hidden, head

    def _kl_tokens(self, model, student_hidden, teacher_hidden, teacher_head, kl_positions,
                   reference: dict | None = None) -> torch.Tensor:
        """[N] KL(base ‖ model) at the N loss positions of the KL rows (row-major order).

        `reference` (the batch's REFERENCE_COLUMNS, KL rows only): the base's stored top-k replace the
        teacher's hidden states (--kl_reference cached).
        """
        lm = causal_lm(self.accelerator.unwrap_model(model))
        config = lm.config.get_text_config()
        if reference is not None:
            return cached_kl_per_token(
                student_hidden[:, :-1][kl_positions], lm.get_output_embeddings(),
                *(reference[name][:, 1:][kl_positions] for name in REFERENCE_COLUMNS),
                logit_scale=getattr(config, "logit_scale", None) or 1.0,
                softcap=getattr(config, "final_logit_softcapping", None),
                token_weights=self._kl_token_weights(kl_positions),
            )
        return forward_kl_per_token(
            student_hidden[:, :-1][kl_positions],
            lm.get_output_embeddings(),
            teacher_hidden[:, :-1][kl_positions].to(student_hidden.dtype),
            teacher_head,
            logit_scale=getattr(config, "logit_scale", None) or 1.0,
            softcap=getattr(config, "final_logit_softcapping", None),
        )

    def _kl_token_weights(self, kl_positions: torch.Tensor) -> torch.Tensor:
        """[N] each KL token's weight in this micro-batch's loss, up to one constant (the step's rows or
        tokens): 1 / its row's KL tokens (row weighting) or 1 (token weighting). The fused cached KL takes
        a trainable head's gradient in the forward with them (a LoRA head is frozen: unused)."""
        counts = kl_positions.sum(1)
        if self.weighting != ROW_WEIGHTING:
            return torch.ones(int(counts.sum()), device=kl_positions.device)
        return 1.0 / counts[kl_positions.nonzero()[:, 0]].float()

    # --- the loss -----------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kl_rows = inputs.pop(KL_COLUMN, None)
        reference = {name: inputs.pop(name) for name in REFERENCE_COLUMNS if name in inputs} or None
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        kl_rows = (torch.zeros(len(labels), dtype=torch.bool) if kl_rows is None else kl_rows).to(labels.device)
        has_kl = bool(kl_rows.any())
        ce_labels = labels.masked_fill(kl_rows[:, None], IGNORE_INDEX)
        # With the stored reference there is no teacher forward at all: that is its whole point.
        teacher_hidden, teacher_head = (self._reference_hidden(model, inputs, kl_rows) if has_kl and reference is None
                                        else (None, None))
        if reference is not None:
            reference = {name: value.to(labels.device)[kl_rows] for name, value in reference.items()}

        with capture_output(self._backbone(model)) as backbone_out, \
                capture_output(self.accelerator.unwrap_model(model)) as lm_out:
            ce_term = super().compute_loss(model, {**inputs, "labels": ce_labels}, False, num_items_in_batch)
        ce_tokens = -lm_out["output"].log_probs  # [B, T-1], zero where the label is -100
        ce_positions = ce_labels[:, 1:] != IGNORE_INDEX
        kl_positions = (labels[:, 1:] != IGNORE_INDEX) & kl_rows[:, None]
        kl_tokens = (self._kl_tokens(model, last_hidden_state(backbone_out["output"])[kl_rows], teacher_hidden,
                                     teacher_head, kl_positions[kl_rows], reference)
                     if has_kl else ce_tokens.new_zeros(0))

        self._log_means(mode, ce_tokens[ce_positions], kl_tokens)
        kl_tokens = kl_tokens * self.kl_coef  # exact at the paper's 1
        if self.weighting == ROW_WEIGHTING:
            loss = self._row_loss(ce_tokens, ce_positions, kl_tokens, kl_positions)
        elif num_items_in_batch is None:  # no step count (evaluation): this micro-batch's tokens
            loss = token_weighted_loss(ce_tokens[ce_positions].sum(), kl_tokens.sum(),
                                       int(ce_positions.sum()) + kl_tokens.numel())
        else:  # TRL's CE is already ce_sum / num_items_in_batch, scaled for the processes
            loss = ce_term + token_weighted_loss(torch.zeros_like(ce_term), kl_tokens.sum(), num_items_in_batch,
                                                 self._process_scale(num_items_in_batch))
        return (loss, None) if return_outputs else loss

    def _process_scale(self, num_items_in_batch) -> int:
        """TRL multiplies its CE by the process count when the step's tokens were counted on all of them."""
        return self.accelerator.num_processes if (
            self.args.average_tokens_across_devices and num_items_in_batch is not None) else 1

    def _row_loss(self, ce_tokens, ce_positions, kl_tokens, kl_positions) -> torch.Tensor:
        """Each row's per-token mean (CE or KL), summed, over the rows of the step (training) or micro-batch."""
        n_rows = ce_positions.size(0)
        ce_rows = ce_positions.nonzero()[:, 0]
        kl_rows = kl_positions.nonzero()[:, 0]
        tokens = torch.cat([ce_tokens[ce_positions], kl_tokens.to(ce_tokens.dtype)])
        row_index = torch.cat([ce_rows, kl_rows + n_rows])  # CE and KL rows are disjoint: keep them apart anyway
        row_means, local_rows = row_means_sum(tokens, row_index, 2 * n_rows)
        if self.model.training and self.rows_in_step is not None:
            return row_weighted_loss(row_means, self.rows_in_step, self.accelerator.num_processes)
        return row_weighted_loss(row_means, local_rows)

    def _log_means(self, mode: str, ce_tokens: torch.Tensor, kl_tokens: torch.Tensor) -> None:
        if ce_tokens.numel():
            self._metrics[mode]["ce_loss"].append(ce_tokens.detach().float().mean().item())
        if kl_tokens.numel():
            self._metrics[mode]["kl_loss"].append(kl_tokens.detach().float().mean().item())
