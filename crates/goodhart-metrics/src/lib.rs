//! Metrics and diagnostics: proxy-gold gap, overoptimisation fits, hacking detectors.
