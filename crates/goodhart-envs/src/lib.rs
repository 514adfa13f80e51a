//! Environments with a gold reward and a hackable proxy.
