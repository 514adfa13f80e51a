//! Advantage estimators (GAE, RLOO, GRPO, BNPO, ...) and loss aggregation.
