//! Training algorithms, experiment configuration and run directories.
