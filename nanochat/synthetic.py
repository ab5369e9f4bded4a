"""
The built-in offline corpus (--data synthetic): documents from a seeded stochastic source with
exactly computable entropy, so a trained model's val bits-per-byte can be compared to a floor.

The source. K domains (chosen uniformly per document), each with its own syllable inventory and
V pseudo-words (word sets are disjoint across domains), plus the sentence end "." as word V.
Within a domain words follow a first-order Markov chain: row V of the transition matrix is the
start distribution (first word of the document and the word after "."); every word row is a
sparse, domain-specific successor set mixed with a Zipf unigram backoff, plus a probability of
".". After "." the document ends with probability p_end[d], else a new sentence starts. So the
experts of an MoE have distinct vocabularies and statistics to specialise on.

Rendering: words joined by single spaces, "." glued to the previous word, the first word of each
sentence capitalised. It is injective (parse_document inverts it), all ASCII.

Why the floor is exact. The val bpb metric sums the model's -log2 q over the target tokens of a
document, excluding the document-delimiter (BOS) targets, and divides by the UTF-8 bytes of those
tokens. The model never pays for "the document ends here", so the right reference at each position
is the true next-word distribution CONDITIONED ON THE DOCUMENT CONTINUING: after "." that is the
start distribution itself (no (1 - p_end) factor); after a word it is its ordinary successor row,
which never ends the document. The end decision is an independent coin flipped only after ".", so
it is a stopping time that tells nothing about the words that would follow. Hence, at every word
position, given the past and given that the position is scored, Gibbs' inequality says the
model's expected cost is >= the entropy of that conditional distribution. Tokens vs words: the
model's token probabilities induce a measure on character strings that gives the rendered text at
least the probability of its canonical BPE tokenization (other tokenizations only add mass), and
"next word is w" (w followed by " " or ".", all inside the scored text) are disjoint events, so the
per-word argument holds with a sub-probability q, where Gibbs still applies. The first word also
carries the domain choice: vocabularies are disjoint, so its true probability is start_d(w0) / K.
Documents are i.i.d., so context from earlier documents in a packed row cannot help either.

  bits(doc)  = log2 K + sum_i -log2 T_d[w_{i-1}, w_i]   (w_{-1} := ".", every emitted word incl. ".")
  floor(split) = sum bits / sum bytes, bytes = len(text.encode("utf-8")).

The true source scores exactly the split's floor; any other model scores more in expectation over
the draw of the split. (An evaluation that crops documents scores a different set of positions,
for which this number is only approximately the floor.)
"""

import bisect
import glob
import json
import math
import os

import numpy as np
from tqdm import tqdm

from nanochat.common import UserError, atomic_write_json
from nanochat.dataset import shard_name, write_shard

FORMAT_VERSION = 1  # bump when the generator changes, so cached corpora are regenerated

# Syllable styles per domain: (onsets, vowels, codas); "" is an empty part. Domains past the
# last style reuse styles; word collisions across domains are then rejected while sampling.
STYLES = [
    (["k", "r", "t", "m", "n", "h"], ["a", "i", "u", "o"], [""]),                # ka ri to mu
    (["s", "m", "d", "l", "dr", "br", "v"], ["e", "o"], ["", "l", "n", "r"]),   # sel mon dra
    (["z", "g", "th", "sh", "x"], ["y", "ae", "ei"], ["", "n", "s"]),           # thy gaen shes
    (["b", "p", "f", "w", "qu"], ["oo", "ia", "u"], ["", "m", "ng"]),           # boo piam qung
]
SYLLABLES_PER_WORD = ([1, 2, 3], [0.35, 0.45, 0.2])
ZIPF_EXPONENT = 1.1
SUCCESSORS = (8, 32)        # sparse successor set size per word (inclusive range)
DIRICHLET_ALPHA = 1.0       # concentration of weights inside a successor set
BACKOFF = (0.25, 0.45)      # per-domain weight of the unigram backoff in every word row
P_STOP = (0.06, 0.14)       # per-word probability that "." follows
P_END = (0.08, 0.14)        # per-domain probability that the document ends after "."


def make_generator(seed=0, n_domains=4, vocab_per_domain=300):
    """Deterministic source for a seed: a plain dict of lists and numpy arrays."""
    if n_domains < 1 or vocab_per_domain < SUCCESSORS[1]:
        raise UserError(f"synthetic data needs n_domains >= 1 and vocab_per_domain >= {SUCCESSORS[1]}")
    rng = np.random.default_rng([seed, 0])
    K, V = n_domains, vocab_per_domain
    zipf = 1.0 / np.arange(1, V + 1) ** ZIPF_EXPONENT
    zipf /= zipf.sum()
    taken, words = set(), []
    trans = np.zeros((K, V + 1, V + 1))
    p_end = np.zeros(K)
    for d in range(K):
        onsets, vowels, codas = STYLES[d % len(STYLES)]
        sylls = [o + v + c for o in onsets for v in vowels for c in codas]
        vocab = []
        for _ in range(1000 * V):
            n = rng.choice(SYLLABLES_PER_WORD[0], p=SYLLABLES_PER_WORD[1])
            w = "".join(sylls[i] for i in rng.integers(len(sylls), size=n))
            if w not in taken:
                taken.add(w)
                vocab.append(w)
                if len(vocab) == V:
                    break
        if len(vocab) < V:
            raise UserError(f"cannot make {V} distinct words for domain {d}; use a smaller vocab")
        # Frequent ranks go to short words, as in natural language (ties in random order).
        order = np.lexsort((rng.random(V), [len(w) for w in vocab]))
        words.append([vocab[i] for i in order] + ["."])
        T = trans[d]
        T[V, :V] = zipf[rng.permutation(V)]  # sentence starters: a different Zipf ranking
        backoff = rng.uniform(*BACKOFF)
        for s in range(V):
            n = int(rng.integers(SUCCESSORS[0], SUCCESSORS[1] + 1))
            succ = rng.choice(V, size=n, replace=False, p=zipf)
            sparse = np.zeros(V)
            sparse[succ] = rng.dirichlet(np.full(n, DIRICHLET_ALPHA))
            stop = rng.uniform(*P_STOP)
            T[s, :V] = (1 - stop) * ((1 - backoff) * sparse + backoff * zipf)
            T[s, V] = stop
        T /= T.sum(axis=1, keepdims=True)
        p_end[d] = rng.uniform(*P_END)
    all_words = [w for ws in words for w in ws[:-1]]
    assert len(set(all_words)) == len(all_words), "domain vocabularies must be disjoint"
    gen = {"seed": seed, "n_domains": K, "vocab_per_domain": V, "words": words, "trans": trans, "p_end": p_end}
    # Sampling tables as Python lists (bisect on a list is much faster than numpy per word).
    # Only nonzero entries, normalised so the last cumulative value is exactly 1.0 > u.
    gen["sampler"] = []
    for d in range(K):
        rows = []
        for s in range(V + 1):
            nz = np.flatnonzero(trans[d, s])
            cum = np.cumsum(trans[d, s, nz])
            rows.append((nz.tolist(), (cum / cum[-1]).tolist()))
        gen["sampler"].append(rows)
    gen["lookup"] = {w: (d, i) for d in range(K) for i, w in enumerate(words[d][:-1])}
    return gen


def render_document(words):
    """Word strings (with ".") -> text: single spaces, "." glued, sentence starts capitalised."""
    out, cap = [], True
    for w in words:
        if w == ".":
            out[-1] += "."
            cap = True
        else:
            out.append(w[0].upper() + w[1:] if cap else w)
            cap = False
    return " ".join(out)


def parse_document(gen, text):
    """Inverse of render_document: text -> (domain, words incl. "."). ValueError if not a document."""
    words = []
    for tok in text.split(" "):
        end = tok.endswith(".")
        w = tok[:-1] if end else tok
        words.append(w[:1].lower() + w[1:])
        if end:
            words.append(".")
    try:
        domains = {gen["lookup"][w][0] for w in words if w != "."}
    except KeyError as e:
        raise ValueError(f"unknown word {e.args[0]!r}") from None
    # Re-rendering rejects anything rendering would not produce (spacing, capitals, a final word).
    if len(domains) != 1 or words[-1] != "." or render_document(words) != text:
        raise ValueError("not a synthetic document")
    return domains.pop(), words


def _sample(gen, rng):
    """One document as (domain, word indices incl. the final "."), drawn with rng."""
    K, V = gen["n_domains"], gen["vocab_per_domain"]
    d = int(rng.integers(K))
    rows, p_end = gen["sampler"][d], gen["p_end"][d]
    seq, s = [], V  # the first word is drawn as if after a "."
    buf, k = rng.random(256).tolist(), 0
    while True:
        if k + 2 > len(buf):
            buf, k = rng.random(256).tolist(), 0
        idx, cum = rows[s]
        s = idx[bisect.bisect_right(cum, buf[k])]
        k += 1
        seq.append(s)
        if s == V:  # the end-of-document coin, flipped only after "."
            u, k = buf[k], k + 1
            if u < p_end:
                return d, seq


def _bits(gen, d, seq):
    """-log2 of the continuation-conditioned probability of a document (see module docstring)."""
    V = gen["vocab_per_domain"]
    seq = np.asarray(seq)
    prev = np.concatenate([[V], seq[:-1]])
    return math.log2(gen["n_domains"]) - float(np.log2(gen["trans"][d][prev, seq]).sum())


def sample_document(gen, rng):
    """(text, bits): a rendered document and its exact cost in bits (module docstring)."""
    d, seq = _sample(gen, rng)
    return render_document([gen["words"][d][i] for i in seq]), _bits(gen, d, seq)


def analytic_stats(gen):
    """Expected bits, bytes and words (incl. ".") per document, from the chain, no sampling.

    Per domain the words and "." are transient states of an absorbing chain: Q = T with the
    "." row scaled by (1 - p_end). Expected visit counts n = alpha (I - Q)^-1 with alpha the start
    row. Bits: log2 K + H(start) for the first word, H(row s) per visit of word s, H(start) per
    continued ".". Bytes: each word costs len + 1 (its preceding space; the first word has none,
    hence the -1), each "." costs 1 (no space before it); capitals do not change the byte count.
    E[bits] / E[bytes] is the limit of sum bits / sum bytes over many documents (renewal-reward).
    """
    K, V = gen["n_domains"], gen["vocab_per_domain"]
    bits = bytes_ = words = 0.0
    for d in range(K):
        T, pe = gen["trans"][d], gen["p_end"][d]
        with np.errstate(divide="ignore", invalid="ignore"):
            H = -np.where(T > 0, T * np.log2(T), 0.0).sum(axis=1)
        Q = T.copy()
        Q[V] *= 1 - pe
        n = np.linalg.solve((np.eye(V + 1) - Q).T, T[V])
        lens = np.array([len(w) for w in gen["words"][d][:-1]])
        bits += (math.log2(K) + H[V] + n[:V] @ H[:V] + n[V] * (1 - pe) * H[V]) / K
        bytes_ += (n[:V] @ (lens + 1) + n[V] - 1) / K
        words += n.sum() / K
    return {"bits_per_doc": bits, "bytes_per_doc": bytes_, "words_per_doc": words, "bits_per_byte": bits / bytes_}


def analytic_bits_per_byte(gen):
    """The entropy floor in bits per byte that long samples converge to."""
    return analytic_stats(gen)["bits_per_byte"]


def shard_path(data_dir, index):
    return os.path.join(data_dir, shard_name(index))


def prepare_synthetic(data_dir, *, num_train_docs=20000, num_val_docs=1000, docs_per_shard=5000, seed=0,
                      n_domains=4, vocab_per_domain=300):
    """Write train shards, then the val shard (last), then data_dir/entropy.json; return its dict.

    Idempotent: if entropy.json (written last, atomically) matches the parameters and the shards
    are there, nothing is done. Train and val come from separate seeded streams, so the val split
    does not depend on num_train_docs.
    """
    if num_train_docs < 1 or num_val_docs < 1 or docs_per_shard < 1:
        raise UserError("synthetic data needs num_train_docs, num_val_docs and docs_per_shard >= 1")
    n_train_shards = math.ceil(num_train_docs / docs_per_shard)
    params = {"format_version": FORMAT_VERSION, "seed": seed, "n_domains": n_domains,
              "vocab_per_domain": vocab_per_domain, "train_docs": num_train_docs, "val_docs": num_val_docs,
              "docs_per_shard": docs_per_shard, "num_shards": n_train_shards + 1}
    info_path = os.path.join(data_dir, "entropy.json")
    try:
        with open(info_path) as f:
            info = json.load(f)
        if all(info.get(k) == v for k, v in params.items()) and \
                all(os.path.exists(shard_path(data_dir, i)) for i in range(n_train_shards + 1)):
            return info
    except (OSError, ValueError):
        pass
    # Start clean: a stale shard would otherwise be read as train data, or as the val shard.
    os.makedirs(data_dir, exist_ok=True)
    for path in [info_path] + glob.glob(os.path.join(data_dir, "shard_*.parquet")):
        if os.path.exists(path):
            os.remove(path)

    gen = make_generator(seed, n_domains, vocab_per_domain)
    with tqdm(total=num_train_docs + num_val_docs, desc="synthetic data", unit="doc") as bar:
        rng = np.random.default_rng([seed, 1])
        for i in range(n_train_shards):
            n = min(docs_per_shard, num_train_docs - i * docs_per_shard)
            write_shard([sample_document(gen, rng)[0] for _ in range(n)], shard_path(data_dir, i))
            bar.update(n)
        rng = np.random.default_rng([seed, 2])
        val = [sample_document(gen, rng) for _ in range(num_val_docs)]
        write_shard([text for text, _ in val], shard_path(data_dir, n_train_shards))
        bar.update(num_val_docs)

    val_bits = sum(bits for _, bits in val)
    val_bytes = sum(len(text.encode("utf-8")) for text, _ in val)
    stats = analytic_stats(gen)
    info = {**params, "val_bits_per_byte": val_bits / val_bytes, "analytic_bits_per_byte": stats["bits_per_byte"],
            "val_bits": val_bits, "val_bytes": val_bytes,
            "analytic_words_per_doc": stats["words_per_doc"], "analytic_bytes_per_doc": stats["bytes_per_doc"]}
    atomic_write_json(info_path, info)
    return info
