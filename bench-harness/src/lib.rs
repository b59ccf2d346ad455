//! The Skein benchmark harness (to be built with the bench issue).
