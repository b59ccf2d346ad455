//! The Skein broker (to be built with the broker issue).
