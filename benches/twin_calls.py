"""The PyTorch-eager twin's measurements one at a time, for
`cargo xtask bench policy --vs-torch --interleave`.

Builds the model, prompts and optimizer of `--twin` (benches/torch_twin.py) as its `main`
does, with the same flags, and warms up generation. Then prints `ready` and, for each line
`gen_tok_s`, `score_tok_s` or `train_tok_s` on stdin, times `--reps` of that figure's calls,
exactly the statements the twin times, and prints the tokens per second. Scoring and
training are warmed up as the twin does, before their first measurement, on the
sequences of the first generation measured. `quit` or the end of stdin ends it.
"""
import argparse, importlib.util, sys, time
import torch, torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--twin', required=True)
    ap.add_argument('--batch', type=int, default=64); ap.add_argument('--prompt', type=int, default=16)
    ap.add_argument('--resp', '--response', dest='resp', type=int, default=64); ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--threads', type=int, default=0)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--width', type=int, default=128); ap.add_argument('--layers', type=int, default=4)
    ap.add_argument('--heads', type=int, default=4); ap.add_argument('--vocab', type=int, default=64)
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location('torch_twin', a.twin)
    twin = importlib.util.module_from_spec(spec); spec.loader.exec_module(twin)
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    torch.set_default_device(a.device)
    m = twin.GPT(V=a.vocab, D=a.width, L=a.layers, H=a.heads); opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    prompt = torch.randint(0, a.vocab, (a.batch, a.prompt))
    sync = (lambda: torch.cuda.synchronize()) if a.device.startswith('cuda') else (lambda: None)
    twin.generate(m, prompt, 8); sync()
    full = None
    def step():
        logits = m(full[:, :-1]); loss = F.cross_entropy(logits.reshape(-1, a.vocab), full[:, 1:].reshape(-1))
        opt.zero_grad(); loss.backward(); opt.step()
    # The twin's order: scoring and training are warmed up right before their first
    # measurement, on the sequences of the first generation measured.
    warm = {'score_tok_s': lambda: m(full), 'train_tok_s': step}
    print('ready', flush=True)
    for line in sys.stdin:
        figure = line.strip()
        if figure == 'quit':
            break
        if figure in warm:
            if full is None:
                sys.exit(f'twin_calls.py: {figure} before any gen_tok_s')
            with torch.no_grad() if figure == 'score_tok_s' else torch.enable_grad():
                warm.pop(figure)()
        sync(); t = time.perf_counter()
        if figure == 'gen_tok_s':
            for _ in range(a.reps): seq, _ = twin.generate(m, prompt, a.resp)
            tokens = a.reps * a.batch * a.resp
        elif figure == 'score_tok_s':
            with torch.no_grad():
                for _ in range(a.reps): F.log_softmax(m(full), -1)
            tokens = a.reps * full.numel()
        elif figure == 'train_tok_s':
            for _ in range(a.reps): step()
            tokens = a.reps * full.numel()
        else:
            sys.exit(f'twin_calls.py: unknown figure {figure!r}')
        sync(); print(tokens / (time.perf_counter() - t), flush=True)
        if figure == 'gen_tok_s' and full is None:
            full = torch.cat([prompt, seq], 1)


if __name__ == '__main__':
    main()
