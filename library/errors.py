"""Errors that mean "the user's input is wrong": the CLI prints their message as one line, no traceback."""


class UserInputError(Exception):
    """Bad input the user can fix (missing folder, broken image, bad flag value).

    The message is a single line that says what is wrong and what to do about it.
    """
