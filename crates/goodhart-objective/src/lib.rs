//! Surrogate losses: PPO-clip family, GSPO, CISPO, value loss, preference losses.
