"""benchmarks/answers_by_question.py: question forms and the per-form tally."""
from tests.benchmark_modules import load_benchmark

answers = load_benchmark("answers_by_question")


def test_question_form_masks_colours_shapes_and_classes_only():
    assert answers.question_form("What color is the circle?") == "What color is the X?"
    assert answers.question_form("Is there an orange diamond in the image?") == "Is there an X X in the image?"
    assert answers.question_form("Where is the red square?") == answers.question_form("Where is the blue circle?")
    assert answers.question_form("How many objects are in the image?") == "How many objects are in the image?"


def test_group_answers_counts_right_and_wrong_per_form():
    questions = ["What color is the circle?", "What color is the square?", "Is there a red circle in the image?"]
    from mage.eval.scorers import score_text

    predictions, references = ["Red", "no", "2"], ["red", "blue", "yes"]
    _, correct = score_text("vqav2", predictions, references)
    groups = answers.group_answers(questions, predictions, references, correct)
    colour = groups["What color is the X?"]
    assert (colour["right"], colour["total"]) == (1, 2) and colour["wrong"] == {("blue", "no"): 1}
    exists = groups["Is there a X X in the image?"]
    assert (exists["right"], exists["total"]) == (0, 1) and exists["wrong"] == {("yes", "2"): 1}
