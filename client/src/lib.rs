//! The native Skein client (to be built with the broker issue).
