//! Policy models: transformer LM with KV-cache sampling, MLP policies, value heads.
