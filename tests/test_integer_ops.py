"""The integer graph of a target-trained model (qdet/quantization/integer_ops.py): each conv's
bias is int32 at the input step times the weight step, read back from the ONNX file."""

import numpy as np
import onnx
from onnx import numpy_helper
from target_models import _export, _target_model


def test_bias_is_int32_at_the_input_step_times_the_weight_step(tmp_path):
    model = _target_model()
    path = tmp_path / "m.onnx"
    _export(model, path)
    proto = onnx.load(str(path))
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) > 20
    for conv in convs:
        x_dq, w_dq, b_dq = (producer[name] for name in conv.input[:3])
        assert values[b_dq.input[0]].dtype == np.int32
        s_x = values[x_dq.input[1]]
        s_w = values[w_dq.input[1]]
        np.testing.assert_allclose(values[b_dq.input[1]], np.float32(s_x) * s_w, rtol=1e-6)
        assert values[w_dq.input[0]].dtype == np.int8
