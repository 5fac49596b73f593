"""Loss tests (a package, so these modules do not clash with tests of the same name elsewhere)."""
