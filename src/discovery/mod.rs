//! DNS-SD: decpud's announcement with TXT metadata and decpu's browsing and selection.
