"""PyTorch-eager twin of `cargo xtask bench policy --hf DIR`: the model a Hugging Face
`config.json` describes, built by transformers with random weights (default attention,
SDPA; no compilation), measured as `benches/torch_twin.py` measures its model: generation
tokens/s (KV cache, sampling at temperature 1), teacher-forced scoring tokens/s, and train
step tokens/s (forward, backward, AdamW at lr 1e-4). Prints one JSON line with the same
keys as goodhart's bench.

    python benches/hf_twin.py --hf DIR --batch 8 --prompt 32 --response 32 --reps 1
"""
import argparse, json, time
import torch, torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache


@torch.no_grad()
def generate(m, prompt, n_new):
    cache = DynamicCache()
    logits = m(input_ids=prompt, cache=cache, use_cache=True).logits
    out = []
    for _ in range(n_new):
        tok = torch.multinomial(F.softmax(logits[:, -1], -1), 1)
        out.append(tok)
        logits = m(input_ids=tok, cache=cache, use_cache=True).logits
    return torch.cat(out, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--hf', required=True)
    ap.add_argument('--batch', type=int, default=8); ap.add_argument('--prompt', type=int, default=32)
    ap.add_argument('--response', type=int, default=32); ap.add_argument('--reps', type=int, default=1)
    ap.add_argument('--threads', type=int, default=0); ap.add_argument('--device', default='cpu')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    torch.set_default_device(a.device)
    config = AutoConfig.from_pretrained(a.hf)
    m = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    V = config.vocab_size
    prompt = torch.randint(0, V, (a.batch, a.prompt))
    sync = (lambda: torch.cuda.synchronize()) if a.device.startswith('cuda') else (lambda: None)
    m.eval(); generate(m, prompt, 8); sync()
    t = time.perf_counter()
    for _ in range(a.reps): seq = generate(m, prompt, a.response)
    sync(); gen = a.reps * a.batch * a.response / (time.perf_counter() - t)
    full = torch.cat([prompt, seq], 1)
    with torch.no_grad(): m(input_ids=full)
    sync(); t = time.perf_counter()
    with torch.no_grad():
        for _ in range(a.reps): F.log_softmax(m(input_ids=full).logits, -1)
    sync(); score = a.reps * full.numel() / (time.perf_counter() - t)
    m.train()
    def step():
        logits = m(input_ids=full[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, V), full[:, 1:].reshape(-1))
        opt.zero_grad(); loss.backward(); opt.step()
    step(); sync()
    t = time.perf_counter()
    for _ in range(a.reps): step()
    sync(); train = a.reps * full.numel() / (time.perf_counter() - t)
    print(json.dumps({'torch': torch.__version__, 'threads': torch.get_num_threads(),
                      'gen_tok_s': gen, 'score_tok_s': score, 'train_tok_s': train,
                      'params': sum(p.numel() for p in m.parameters())}))


if __name__ == '__main__':
    main()
