//! Reward models and reward functions: Bradley-Terry, ensembles, shaping, debiasing.
