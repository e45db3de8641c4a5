"""Errors a request can fail with before it runs; each message says what to fix."""


class RequestError(ValueError):
    pass


class ContextLengthError(RequestError):
    def __init__(self, num_tokens: int, max_tokens: int):
        self.num_tokens, self.max_tokens = num_tokens, max_tokens
        super().__init__(
            f"the prompt has {num_tokens} tokens but this model's context (session_len) is {max_tokens} "
            "tokens, and at least one must be left to generate; shorten the prompt or raise session_len"
        )
