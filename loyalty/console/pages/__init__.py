"""The console's pages: one module (and one ``router``) per page or page group."""
