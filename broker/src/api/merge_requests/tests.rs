use super::*;

#[test]
fn a_422_list_is_a_refused_merge_request() {
    let body = |v: Value| serde_json::to_vec(&v).unwrap();
    let e = mr_refused(
        422,
        &body(json!({"message": ["Source branch \"x\" does not exist"]})),
    )
    .expect("named");
    assert_eq!(e.code, "merge_request_refused");
    assert_eq!(e.status.as_u16(), 422);
    assert!(e.message.contains("Source branch \"x\" does not exist"));
    // Other statuses and shapes stay GitLab errors.
    assert!(mr_refused(400, &body(json!({"message": ["x"]}))).is_none());
    assert!(mr_refused(422, &body(json!({"message": "x"}))).is_none());
    assert!(mr_refused(422, &body(json!({"error": "x"}))).is_none());
}
