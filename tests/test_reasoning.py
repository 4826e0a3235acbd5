from edlm.recipes import reasoning


def test_generator_is_deterministic():
    a = [reasoning.problem("train", i) for i in range(50)]
    b = [reasoning.problem("train", i) for i in range(50)]
    assert a == b
    assert a != [reasoning.problem("test", i) for i in range(50)]


def test_train_and_test_do_not_overlap():
    test_q = {p.question for p in reasoning.test_problems()}
    assert len(test_q) == reasoning.TEST_SIZE  # no duplicate inside the held-out split either
    assert not any(p.question in test_q for p in reasoning.train_problems(20_000))


def test_solutions_are_correct_and_scored():
    for p in reasoning.test_problems(200):
        *steps, last = p.solution.split(". ")
        for eq in steps:  # every worked step is true arithmetic
            for part in eq.split(". "):
                lhs, rhs = part.rstrip(".").split("=")
                assert eval(lhs) == int(rhs)  # noqa: S307 - our own generated digits and operators
        assert last == f"#### {p.answer}"
        assert reasoning.exact_match(p.response, p)
        assert not reasoning.exact_match(p.response.replace(f"#### {p.answer}", f"#### {p.answer + 1}"), p)
    assert reasoning.extract_answer("no answer here") is None


def test_problems_are_multi_step():
    steps = [p.solution.count("=") for p in reasoning.test_problems(200)]
    assert min(steps) >= 2 and max(steps) >= 4
