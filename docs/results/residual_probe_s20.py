"""Prototype: compensate the attention left out by the selection (not for the repo)."""
import copy, math, os, sys, time
import torch
sys.path.insert(0, "/work/main")
from benchmarks.quality import load, _step
from kvswap_vllm.runtime import hf_kvswap as H
from kvswap_vllm.attention.sparse import selected_positions, gather_kv
from kvswap_vllm.attention.blockwise import BlockwiseSoftmax, attention_with_lse
from kvswap_vllm.predict.base import SelectionConfig
from kvswap_vllm.models.prepare import resolve_model

MODE = {"v": "none", "chunk": 64}
VBASIS = []
BASIS_FROM = os.environ.get("BASIS", "calib")

def est_logits(ref, layer, q):
    p = ref.predictor; s = ref.shape
    a = p.adapter.joint[layer].view(s.num_kv_heads, s.head_dim, -1)
    qq = q.float().view(s.num_kv_heads, s.gqa, s.head_dim)
    q_lr = torch.bmm(qq, a).reshape(s.num_q_heads, -1) * s.head_dim ** -0.5
    keys = p._keys(layer)[0].float()  # 16-bit keys: no scale
    return q_lr @ keys.T  # (Hq, tokens) estimated scaled logits

orig_decode = H.KVSwapReference._decode
def decode(self, module, query, key, value, **kw):
    mode = MODE["v"]
    if mode == "none" or self.predictor_name != "kvswap":
        return orig_decode(self, module, query, key, value, **kw)
    layer, g = module.layer_idx, self.selection.group_size
    real_q = query[0, :, -1]
    prev = self._last.get(layer)
    previous = None if prev is None else torch.tensor(sorted(prev), dtype=torch.int64)
    groups = self.predictor.select(layer, real_q, previous)
    nfull = self.predictor.num_groups(layer) * g
    positions = selected_positions(groups, g, nfull, key.shape[2])
    k_sel, v_sel = gather_kv(key, value, positions)
    self._last[layer] = set(groups.tolist())
    if layer == 0: self.stats.steps += 1
    scale = kw.get("scaling") or module.scaling
    out, lse = attention_with_lse(query[0], k_sel[0], v_sel[0], scale, causal=False)  # (Hq,1,d),(Hq,1)
    if len(groups) * g == nfull:
        return out.transpose(0, 1).unsqueeze(0), None
    unsel = torch.ones(nfull, dtype=torch.bool); unsel[positions[positions < nfull]] = False
    hq, hk = query.shape[1], key.shape[1]; gqa = hq // hk
    if mode.startswith("oracle"):
        kk = key[0, :, :nfull].repeat_interleave(gqa, 0)
        logit = torch.einsum("hd,htd->ht", real_q.float(), kk.float()) * scale
    else:
        logit = est_logits(self, layer, real_q)
    logit = logit[:, unsel]  # (Hq, U)
    vu = value[0, :, :nfull][:, unsel].float().repeat_interleave(gqa, 0)  # (Hq, U, d)
    if mode.endswith("exact"):  # exact weighted V of U with the logits used
        w = torch.softmax(logit, -1); cv = (w.unsqueeze(-1) * vu).sum(1)
    elif mode.endswith("global"):
        cv = vu.mean(1)
    elif mode.startswith("lrv"):
        r = int(mode[3:]); B = VBASIS[layer][:, :r]  # (H*d, r)
        vc = value[0, :, :nfull][:, unsel].float().transpose(0, 1).reshape(-1, hk * value.shape[-1])  # (U, H*d)
        vh = ((vc @ B) @ B.T).view(-1, hk, value.shape[-1]).transpose(0, 1).repeat_interleave(gqa, 0)
        w = torch.softmax(logit, -1); cv = (w.unsqueeze(-1) * vh).sum(1)
    elif mode.endswith("chunk"):
        C = MODE["chunk"]; idx = torch.arange(nfull)[unsel] // C; nc = int(nfull // C + 1)
        w = torch.softmax(logit, -1)  # (Hq,U)
        cnt = torch.zeros(nc).index_add_(0, idx, torch.ones(len(idx)))
        vsum = torch.zeros(hq, nc, vu.shape[-1]).index_add_(1, idx, vu)
        vmean = vsum / cnt.clamp(min=1).view(1, -1, 1)
        wc = torch.zeros(hq, nc).index_add_(1, idx, w)
        cv = (wc.unsqueeze(-1) * vmean).sum(1)
    clse = torch.logsumexp(logit, -1) + MODE.get("bias", 0.0)
    acc = BlockwiseSoftmax(); acc.add(out, lse); acc.add(cv.unsqueeze(1), clse.unsqueeze(1))
    return acc.result(query.dtype).transpose(0, 1).unsqueeze(0), None
H.KVSwapReference._decode = decode

@torch.inference_mode()
def run(variants, context=6500, positions=512):
    from kvswap_vllm.predict.calibration_text import stdlib_docstrings
    model_dir = resolve_model(None)
    tok, model, adapter = load(model_dir, None, 8192)
    ref = H.KVSwapReference(model, "kvswap", SelectionConfig(400, 4), adapter=adapter, layer_ahead=False, flush_groups=16)
    text = stdlib_docstrings(max_chars=1_200_000)[600_000:]
    ids = tok(text, return_tensors="pt").input_ids[:, : context + positions + 1]
    ref.sparse = False
    prefix = model(input_ids=ids[:, :context], use_cache=True).past_key_values
    ref.sparse = True
    src = prefix if BASIS_FROM == "self" else model(input_ids=tok(stdlib_docstrings(max_chars=300_000)[:200_000], return_tensors="pt").input_ids[:, :4096], use_cache=True).past_key_values
    for l in range(len(prefix.layers)):
        v = src.layers[l].values[0].float()  # (H, T, d)
        vc = v.transpose(0, 1).reshape(v.shape[1], -1)
        VBASIS.append(torch.linalg.svd(vc, full_matrices=False).Vh.T)
    targets = ids[0, context + 1: context + positions + 1]
    res, am = {}, {}
    for name, pred, mode in variants:
        MODE["v"] = mode
        ref.predictor_name = pred; ref.start_sequence()
        past = copy.deepcopy(prefix); nll = 0.0; picks = []; t0 = time.time()
        for j in range(positions):
            logits, past = _step(model, ids[0, context + j], past)
            nll += float(torch.nn.functional.cross_entropy(logits.view(1, -1), targets[j].view(1)))
            picks.append(int(logits.argmax()))
        am[name] = torch.tensor(picks); res[name] = {"ppl": math.exp(nll / positions)}
        d = am.get("dense")
        if d is not None:
            res[name]["top1"] = float((am[name] == d).float().mean())
            res[name]["ppl_rel"] = res[name]["ppl"] / res["dense"]["ppl"] - 1
        print(name, res[name], f"{time.time()-t0:.0f}s", flush=True)
    return res

if __name__ == "__main__":
    vs = [("dense", "dense", "none")]
    for v in sys.argv[1].split(","):
        vs.append((v, "kvswap", v))
    pos = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    run(vs, positions=pos)
