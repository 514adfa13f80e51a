//! Regularisers: KL estimators and controllers, entropy, chi-squared occupancy, GARDO, constraints.
