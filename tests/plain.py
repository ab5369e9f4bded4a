"""The model with none of nanochat's architecture pieces (value embeddings, layer lambdas, smear,
backout, short windows, rotary/qk/vocab/init tweaks, weight casting): the model before they existed,
for tests about other things (MoD, Mamba, growth, MoE accounting, compile, optimizer steps, ...).

GPTConfig's defaults are the pieces the study adopted; a test whose subject is something else pins
them off with GPTConfig(**PLAIN, ...) (or the flags in PLAIN_FLAGS for a CLI run), so that it keeps
testing the same thing whichever pieces end up on by default.
"""

PLAIN = dict(value_embeds=False, layer_lambdas=False, smear=False, backout=False, window_pattern="L",
             rotary_base=10000.0, qk_scale=1.0, vocab_pad=1, embedding_init_std=1.0, fc_init_scale=1.0,
             cast_weights=False)

# The same for a command line (base_train, grow, the planners): the fields that default on, off.
PLAIN_FLAGS = ["--no-value-embeds", "--no-smear", "--no-backout", "--window-pattern", "L", "--qk-scale", "1",
               "--embedding-init-std", "1", "--fc-init-scale", "1"]
