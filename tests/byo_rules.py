"""A user's update rule, registered by name (selected in a job file with optimizer.module)."""

from downpour.server.optim import UpdateRule, register_rule


@register_rule("signsgd")
class SignSGD(UpdateRule):
    def apply(self, param, grad, lo, hi, step):
        param[lo:hi].add_(grad.sign(), alpha=-self.lr * float(self.cfg.args.get("scale", 1.0)))
