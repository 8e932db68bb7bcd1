"""A first end-to-end check of the app factory and the predict endpoint."""

from tests.support import digit_image, encode


def test_predict_answers_in_the_template_shape(client):
    image, _ = digit_image(0)
    response = client.post("/api/v1/model/predict", data={"image_file": (__import__("io").BytesIO(encode(image)), "digit.png")})
    assert response.status_code == 200, response.json
    (item,) = response.json["data"]
    assert item["image_filename"] == "digit.png"
    assert item["prediction"] in [str(d) for d in range(10)]
