//! The Skein wire protocol (to be specified with the broker issue).
