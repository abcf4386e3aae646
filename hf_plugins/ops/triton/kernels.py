"""The Triton kernel of the fused loss head: weighted-target cross-entropy over one tile of logits rows.

One program per row. The tile `z [C, V]` was just computed by a cuBLAS matmul; the program

1. folds the row into online log-sum-exp statistics (policy, tempered policy, reference), the entropy sum and the
   top-1 test, one vocabulary block at a time;
2. draws the row's sampled tokens by inverse CDF over the tempered policy (OTR), one more pass;
3. builds the target weights `w` block by block (label entry, sampled entries, dense reference or tempered part) and
   overwrites the tile with the logits gradient `scale * (sum(w) * p - w)`, summing the dense part of the loss.

Nothing of size [C, V] besides the tile itself is written. Arithmetic is in `ACC` (float32, float64 for float64
tiles); bf16/fp16 tiles are read and upcast (the Triton interpreter computes bf16 arithmetic wrongly, so no
arithmetic happens in bf16).

Per-row outputs (`stats[row, :]`): loss, log p(label), entropy, top-1 hit, then two method values: the KL to the
reference (REFERENCE) or the number of sampled hits (NUM_SAMPLES) or the tempered label probability
(TEMPERED_DENSE), and the DFT weight `p(label)`. The row's logits are `logit_scale * softcap(scale * z)`
throughout: the model's logit transform (`scale`, then `softcap * tanh(x / softcap)` with SOFTCAP, as `tanh(x) =
2 sigmoid(2x) - 1`: libdevice's tanh is a stub under the interpreter) and the method's `logit_scale` (GRPO's
temperature); the gradient is taken through both (`scale * logit_scale * (1 - tanh^2)`). A reference's logits get
its own transform (REF_SOFTCAP and its scale). With HAS_UNIFORM every token also gets a per-row weight
`uniform_mass / V` (label smoothing). With HAS_ENTROPY_WEIGHT the gradient also gets GRPO's entropy bonus
`kappa * p (log p + H)` (the loss statistic then leaves the bonus out: the caller supplies the exact row loss).
"""

from __future__ import annotations

import triton
import triton.language as tl


NUM_STATS = 6
STAT_LOSS, STAT_LABEL_LOGP, STAT_ENTROPY, STAT_TOP1, STAT_AUX, STAT_LABEL_PROB = range(NUM_STATS)
#: Scalars passed through a small tensor (exact in float64, and no Python-float argument quirks); kernels read
#: globals only as constexpr
PARAM_GRAD_SCALE = tl.constexpr(0)
PARAM_INV_TEMPERATURE = tl.constexpr(1)
PARAM_MISS_REWARD = tl.constexpr(2)
PARAM_DENSE_COEF = tl.constexpr(3)
PARAM_LOGIT_SCALE = tl.constexpr(4)
PARAM_MODEL_SCALE = tl.constexpr(5)
PARAM_SOFTCAP = tl.constexpr(6)
PARAM_REF_SCALE = tl.constexpr(7)
PARAM_REF_SOFTCAP = tl.constexpr(8)
NUM_PARAMS = 9
NUM_STATS_C = tl.constexpr(NUM_STATS)


@triton.jit
def _online_update(m, s, x, mask):
    """Fold block `x` into running max `m` and sum `s` of exp(x - m); returns (m, s, exp(x - new_m))."""
    new_m = tl.maximum(m, tl.max(x, axis=0))
    # A row whose every logit so far is -inf keeps m = -inf; exp(-inf - -inf) would be NaN
    rescale = tl.where(new_m == -float("inf"), 0.0, tl.exp(m - new_m))
    e = tl.where(mask & (x > -float("inf")), tl.exp(x - new_m), 0.0)
    return new_m, s * rescale + tl.sum(e, axis=0), e, rescale


@triton.jit
def _transformed(raw, mask, scale, softcap, post_scale, SOFTCAP: tl.constexpr):
    """The logits `post_scale * softcap(scale * raw)` of a block (-inf where masked) and, with SOFTCAP, the tanh of the
    cap (for the gradient's `1 - tanh^2`; 0 without)."""
    z = raw * scale
    th = z * 0.0
    if SOFTCAP:
        th = 2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0
        z = softcap * th
    return tl.where(mask, z * post_scale, -float("inf")), th


@triton.jit
def weighted_target_ce_kernel(
    logits_ptr,
    logits_stride,
    ref_ptr,
    ref_stride,
    labels_ptr,
    label_weight_ptr,
    reference_weight_ptr,
    entropy_weight_ptr,
    uniform_mass_ptr,
    uniforms_ptr,
    uniforms_stride,
    stats_ptr,
    params_ptr,
    vocab_size,
    LABEL_TARGET: tl.constexpr,  # the label gets a sparse weight (all methods but sampled OTR)
    HAS_LABEL_WEIGHT: tl.constexpr,  # the label weight is read per row (token-weighted SFT)
    DFT: tl.constexpr,  # the label weight is multiplied by sg(p(label))
    TEMPERED: tl.constexpr,  # track softmax(z / tau) (OTR)
    TEMPERED_DENSE: tl.constexpr,  # exact-expectation OTR: w = (1-beta) p_tau(y) 1_y + beta p_tau
    NUM_SAMPLES: tl.constexpr,  # sampled OTR: K tokens from p_tau, weight R(a, y) / K each
    K_PAD: tl.constexpr,
    REFERENCE: tl.constexpr,  # ASFT: dense target kl_coef * softmax(z_ref)
    HAS_REFERENCE_WEIGHT: tl.constexpr,  # the reference's coefficient is scaled per row (0: no reference there)
    HAS_ENTROPY_WEIGHT: tl.constexpr,  # GRPO's entropy bonus: dense target -kappa * p (log p + H), kappa per row
    HAS_UNIFORM: tl.constexpr,  # a per-row weight uniform_mass / V on every token (label smoothing)
    SOFTCAP: tl.constexpr,  # the model soft-caps its logits
    REF_SOFTCAP: tl.constexpr,  # the reference model soft-caps its logits
    WRITE_GRAD: tl.constexpr,
    LAST_PASS: tl.constexpr,  # WRITE_GRAD or a dense target (whose loss needs the pass even without gradients)
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * logits_stride
    ninf = -float("inf")
    grad_scale = tl.load(params_ptr + PARAM_GRAD_SCALE)
    inv_t = tl.load(params_ptr + PARAM_INV_TEMPERATURE)
    miss_reward = tl.load(params_ptr + PARAM_MISS_REWARD)
    dense_coef = tl.load(params_ptr + PARAM_DENSE_COEF)
    if HAS_REFERENCE_WEIGHT:
        dense_coef = dense_coef * tl.load(reference_weight_ptr + row).to(ACC)
    logit_scale = tl.load(params_ptr + PARAM_LOGIT_SCALE)  # the method's factor after the cap (GRPO: 1 / tau)
    model_scale = tl.load(params_ptr + PARAM_MODEL_SCALE)
    softcap = tl.load(params_ptr + PARAM_SOFTCAP)
    ref_scale = tl.load(params_ptr + PARAM_REF_SCALE)
    ref_softcap = tl.load(params_ptr + PARAM_REF_SOFTCAP)

    label = tl.load(labels_ptr + row)
    z_label, _th = _transformed(tl.load(z_row + label).to(ACC), label >= 0, model_scale, softcap, logit_scale, SOFTCAP)

    zero = grad_scale * 0.0  # a scalar of the accumulation dtype (the params tensor is in ACC)
    m = zero + ninf
    s = zero
    sz = zero  # sum exp(z - m) * z, for the entropy
    max_before = zero + ninf  # largest logit before the label: argmax returns the first maximum
    mt = zero + ninf
    st = zero
    mr = zero + ninf
    sr = zero
    z_sum = zero  # sum of the logits, for the uniform weight's loss

    # ---- pass 1: online statistics
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < vocab_size
        z, _th = _transformed(
            tl.load(z_row + offs, mask=mask, other=0.0).to(ACC), mask, model_scale, softcap, logit_scale, SOFTCAP
        )
        m, s, e, rescale = _online_update(m, s, z, mask)
        sz = sz * rescale + tl.sum(e * tl.where(e > 0, z, 0.0), axis=0)  # e = 0 where z = -inf: no 0 * inf
        max_before = tl.maximum(max_before, tl.max(tl.where(offs < label, z, ninf), axis=0))
        if TEMPERED:
            mt, st, _et, _rt = _online_update(mt, st, z * inv_t, mask)
        if HAS_UNIFORM:
            z_sum = z_sum + tl.sum(tl.where(mask, z, 0.0), axis=0)
        if REFERENCE:
            zr, _thr = _transformed(
                tl.load(ref_ptr + row * ref_stride + offs, mask=mask, other=0.0).to(ACC),
                mask,
                ref_scale,
                ref_softcap,
                1.0,
                REF_SOFTCAP,
            )
            mr, sr, _er, _rr = _online_update(mr, sr, zr, mask)

    lse = m + tl.log(s)
    label_logp = z_label - lse
    label_prob = tl.exp(label_logp)
    entropy = lse - sz / s
    top1 = ((z_label >= m) & (z_label > max_before)).to(ACC)
    lse_t = zero
    if TEMPERED:
        lse_t = mt + tl.log(st)
    lse_r = zero
    if REFERENCE:
        lse_r = mr + tl.log(sr)

    # ---- sparse targets: the label entry
    label_weight = zero
    if LABEL_TARGET:
        label_weight = zero + 1.0
        if HAS_LABEL_WEIGHT:
            label_weight = tl.load(label_weight_ptr + row).to(ACC)
        if DFT:
            label_weight = label_weight * label_prob
        if TEMPERED_DENSE:
            label_weight = label_weight * (1.0 - miss_reward) * tl.exp(z_label * inv_t - lse_t)
    total = label_weight
    loss = label_weight * (lse - z_label)
    aux = zero

    # ---- pass 2 (sampled OTR): inverse-CDF sampling from softmax(z / tau)
    ks = tl.arange(0, K_PAD)
    kmask = ks < NUM_SAMPLES
    samples = tl.full((K_PAD,), -1, tl.int64)
    rewards = tl.zeros((K_PAD,), dtype=ACC)
    if NUM_SAMPLES > 0:
        u = tl.load(uniforms_ptr + row * uniforms_stride + ks, mask=kmask, other=0.0).to(ACC)
        points = u * st  # the CDF is left unnormalised (relative to mt): the target is u * total mass
        running = zero
        last_positive = label * 0
        for start in range(0, vocab_size, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < vocab_size
            z, _th = _transformed(
                tl.load(z_row + offs, mask=mask, other=0.0).to(ACC), mask, model_scale, softcap, logit_scale, SOFTCAP
            )
            e = tl.where(mask & (z > ninf), tl.exp(z * inv_t - mt), 0.0)
            block_mass = tl.sum(e, axis=0)
            # Only a block that holds a pending point needs prefix sums and the K x BLOCK comparison: at most K
            # blocks of the row, so the pass costs about one read of the row
            pending = (samples < 0) & kmask & (points < running + block_mass)
            if tl.sum(pending.to(tl.int32), axis=0) > 0:
                cdf = running + tl.cumsum(e, axis=0)
                # first token whose CDF exceeds the point = number of tokens in the block whose CDF does not
                below = (cdf[None, :] <= points[:, None]) & mask[None, :]
                count = tl.sum(below.to(tl.int32), axis=1).to(tl.int64)
                valid = tl.sum(mask.to(tl.int32), axis=0).to(tl.int64)
                found = (samples < 0) & (count < valid)
                samples = tl.where(found, start + count, samples)
            running = running + block_mass
            last_positive = tl.maximum(last_positive, tl.max(tl.where(e > 0, offs, -1), axis=0).to(tl.int64))
        # A point left past the end by rounding of the total takes the last token with mass (never a zero-mass one)
        samples = tl.where(kmask & (samples < 0), last_positive, samples)
        samples = tl.where(kmask, samples, -1)
        hits = (samples == label) & kmask
        rewards = tl.where(hits, 1.0, miss_reward) / NUM_SAMPLES
        rewards = tl.where(kmask, rewards, 0.0)
        z_samples, _ths = _transformed(
            tl.load(z_row + tl.maximum(samples, 0), mask=kmask, other=0.0).to(ACC),
            kmask,
            model_scale,
            softcap,
            logit_scale,
            SOFTCAP,
        )
        total = total + tl.sum(rewards, axis=0)
        loss = loss + tl.sum(tl.where(kmask, rewards * (lse - z_samples), 0.0), axis=0)
        aux = tl.sum(hits.to(ACC), axis=0)

    if TEMPERED_DENSE:
        total = total + miss_reward
        aux = tl.exp(z_label * inv_t - lse_t)
    if REFERENCE:
        total = total + dense_coef
    uniform = zero  # the weight of every token
    if HAS_UNIFORM:
        uniform_mass = tl.load(uniform_mass_ptr + row).to(ACC)
        uniform = uniform_mass / vocab_size
        total = total + uniform_mass
        # -uniform_mass * mean_v log p_v
        loss = loss + uniform_mass * (lse - z_sum / vocab_size)

    kappa = zero
    if HAS_ENTROPY_WEIGHT:
        kappa = tl.load(entropy_weight_ptr + row).to(ACC)

    # ---- pass 3: dense part of the loss, and the gradient written over the tile
    if LAST_PASS:
        dense_loss = zero
        kl = zero
        neg_entropy_ref = zero
        for start in range(0, vocab_size, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < vocab_size
            z, th = _transformed(
                tl.load(z_row + offs, mask=mask, other=0.0).to(ACC), mask, model_scale, softcap, logit_scale, SOFTCAP
            )
            live = mask & (z > ninf)
            log_p = z - lse
            p = tl.where(live, tl.exp(log_p), 0.0)
            w = tl.zeros((BLOCK_V,), dtype=ACC)
            if LABEL_TARGET:
                w = tl.where(offs == label, label_weight, w)
            if NUM_SAMPLES > 0:
                in_block = (samples >= start) & (samples < start + BLOCK_V)
                if tl.sum(in_block.to(tl.int32), axis=0) > 0:  # most blocks hold no sample
                    w = w + tl.sum(tl.where(offs[None, :] == samples[:, None], rewards[:, None], 0.0), axis=0)
            if TEMPERED_DENSE:
                d = tl.where(live, miss_reward * tl.exp(z * inv_t - lse_t), 0.0)
                dense_loss = dense_loss - tl.sum(d * tl.where(d != 0, log_p, 0.0), axis=0)
                w = w + d
            if HAS_UNIFORM:
                w = w + tl.where(mask, uniform, 0.0)
            if REFERENCE:
                zr, _thr = _transformed(
                    tl.load(ref_ptr + row * ref_stride + offs, mask=mask, other=0.0).to(ACC),
                    mask,
                    ref_scale,
                    ref_softcap,
                    1.0,
                    REF_SOFTCAP,
                )
                log_q = zr - lse_r
                q = tl.where(mask & (zr > ninf), tl.exp(log_q), 0.0)
                # q * (log q - log p) term by term: exactly 0 when the policy equals the reference
                kl = kl + tl.sum(q * tl.where(q > 0, log_q - log_p, 0.0), axis=0)
                neg_entropy_ref = neg_entropy_ref + tl.sum(q * tl.where(q > 0, log_q, 0.0), axis=0)
                d = dense_coef * q
                dense_loss = dense_loss - tl.sum(d * tl.where(d > 0, log_p, 0.0), axis=0)
                w = w + d
            if WRITE_GRAD:
                grad = total * p - w
                if HAS_ENTROPY_WEIGHT:
                    # sum_v of the dense target is 0, so it enters as -w only; p = 0 where z = -inf (no 0 * inf)
                    grad = grad + kappa * p * (tl.where(live, log_p, 0.0) + entropy)
                grad = grad_scale * grad
                if SOFTCAP:
                    grad = grad * (1.0 - th * th)
                tl.store(z_row + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)
        loss = loss + dense_loss
        if REFERENCE:
            # KL(q || p) = -sum q log p + sum q log q: the cross-entropy plus the reference's negative entropy
            loss = loss + dense_coef * neg_entropy_ref
            aux = kl

    out = stats_ptr + row * NUM_STATS_C
    tl.store(out + 0, loss)
    tl.store(out + 1, label_logp)
    tl.store(out + 2, entropy)
    tl.store(out + 3, top1)
    tl.store(out + 4, aux)
    tl.store(out + 5, label_prob)
