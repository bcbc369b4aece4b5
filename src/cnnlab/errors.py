class UserError(Exception):
    """A mistake in what the user asked for (a setting, a path, a file): reported as one
    paragraph and a non-zero exit, never as a traceback."""
